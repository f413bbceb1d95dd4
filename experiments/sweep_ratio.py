"""Sweep the synthetic-caption ratio p: train and evaluate one model per p, then report.

    python experiments/sweep_ratio.py --task clip --p 0.15
    python experiments/sweep_ratio.py --task clip --p 0,0.15,0.5,1.0 --out runs/sweep1
    python experiments/sweep_ratio.py --task clip --p 0,0.15,0.5,1.0 --out runs/s --launcher slurm \
        --partition gpu --time 12:00:00 --dry-run
    python experiments/sweep_ratio.py status --out runs/s

With no --launcher each point runs here, one after the other. --launcher slurm submits one Slurm
job array (a job per point, resources from the preset and the flags below); --launcher local
runs submitit local jobs on this machine, at most one per free GPU set. Run folders keep a
state.json; running the same sweep again skips finished points and resubmits failed or missing
ones. With no other flag it uses the embedded preset and testbed (built on first use, then cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from caption_mixing.mixing import parse_p_list  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from clip_train.config import list_presets
    from experiments.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="clip", help="what to train and evaluate")
    parser.add_argument("--p", default="0.15", help="synthetic-caption ratio, or a comma list like 0,0.15,1.0")
    parser.add_argument(
        "--preset",
        default="embedded",
        help=f"a preset of --task (clip: {', '.join(list_presets())}; t2i: see t2i/presets) or a YAML file",
    )
    parser.add_argument("--out", default="runs", help="sweep folder; one run folder per p goes inside")
    parser.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    parser.add_argument("--testbed-dir", default=None, help="where the embedded testbed is built/cached")
    parser.add_argument("--force", action="store_true", help="re-run points even if finished or made by another config")

    g = parser.add_argument_group("launching (default: in-process, sequential)")
    g.add_argument("--launcher", choices=["slurm", "local"], default=None, help="submit through submitit")
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted and change nothing")
    g.add_argument("--wait", action="store_true", help="slurm: block until the jobs leave the queue, then report")
    g.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="with --wait: give up after S s")
    g.add_argument("--max-requeues", type=int, default=3, help="requeues per job after preemption/timeout")
    g.add_argument("--nodes", type=int, help="nodes per job (default: from the preset)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: from the preset)")
    g.add_argument("--tasks-per-node", type=int, help="processes per node, one per GPU for DDP")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    g.add_argument("--mem-gb", type=float, help="memory per node in GB")
    g.add_argument("--time", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm QoS")
    g.add_argument("--constraint", help="Slurm node features, e.g. a100")
    g.add_argument(
        "--sbatch", action="append", metavar="OPT[=VAL]", help="extra sbatch option without --, e.g. exclusive"
    )
    g.add_argument("--max-parallel", type=int, help="jobs running at once (slurm array throttle / local jobs)")
    g.add_argument("--signal-delay-s", type=int, help="seconds before the time limit to checkpoint (default 90)")
    g.add_argument("--sec-per-step", type=float, help="step time used to check --time (default: measured/preset)")
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep_ratio.py status", description="Show each run's state and job id.")
    parser.add_argument("--out", required=True, help="sweep folder")
    return parser


def status_main(argv: list[str]) -> int:
    from experiments.launch import format_status, maybe_write_report, status_rows

    parser = build_status_parser()
    args = parser.parse_args(argv)
    try:
        rows = status_rows(Path(args.out))
    except FileNotFoundError as e:
        parser.error(str(e))
    print(format_status(rows))
    paths = maybe_write_report(Path(args.out))
    if paths:
        print("\nreport: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _resources(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from experiments.launch import parse_sbatch_extra, parse_time_min, preset_resources

    res = preset_resources(args.preset)
    for flag in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "max_parallel", "signal_delay_s"):
        value = getattr(args, flag)
        if value is not None:
            if value < (0 if flag == "gpus_per_node" else 1):
                parser.error(f"--{flag.replace('_', '-')}: {value} is not a valid count")
            setattr(res, flag, value)
    if args.mem_gb is not None:
        if args.mem_gb <= 0:
            parser.error(f"--mem-gb: {args.mem_gb} must be positive")
        res.mem_gb = args.mem_gb
    if args.sec_per_step is not None:
        if args.sec_per_step <= 0:
            parser.error(f"--sec-per-step: {args.sec_per_step} must be positive")
        res.sec_per_step = args.sec_per_step
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            setattr(res, key, getattr(args, key))
    try:
        if args.time is not None:
            res.time_min = parse_time_min(args.time, "--time")
        res.extra = parse_sbatch_extra(args.sbatch, "--sbatch")
    except ValueError as e:
        parser.error(str(e))
    if args.max_requeues < 0:
        parser.error(f"--max-requeues: {args.max_requeues} must be >= 0")
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ps = parse_p_list(args.p, "--p")
    except ValueError as e:
        parser.error(str(e))

    from caption_mixing.presets import parse_overrides
    from experiments import launch
    from experiments.tasks import get_task

    task = get_task(args.task)
    res = _resources(args, parser)
    launcher = args.launcher or "inprocess"
    if args.wait and launcher != "slurm":
        parser.error("--wait applies to --launcher slurm (local and in-process sweeps always wait)")

    try:
        overrides = parse_overrides(args.overrides)
        if "p" in overrides:
            parser.error("--set p=... is not allowed; use --p")
        configs = [task.load_config(args.preset, {**overrides, "p": p}) for p in ps]
    except ValueError as e:
        parser.error(str(e))

    out = Path(args.out).resolve()
    testbed_dir = str(Path(args.testbed_dir).resolve()) if args.testbed_dir else None
    specs = [
        launch.PointSpec(
            task=task.name,
            preset=args.preset,
            overrides={**overrides, "p": cfg.p},
            out=str(out),
            run_dir=str(task.run_dir_for(out, cfg)),
            p=cfg.p,
            config_hash=task.config_hash(cfg),
            testbed_dir=testbed_dir,
            force=args.force,
            max_requeues=args.max_requeues,
        )
        for cfg in configs
    ]

    # Plan every point before touching anything: a conflict anywhere stops the whole sweep.
    plans = [launch.plan_point(spec) for spec in specs]
    conflicts = [reason for action, reason in plans if action == "conflict"]
    if conflicts:
        print("error: " + "\n       ".join(conflicts), file=sys.stderr)
        print("use another --out, or --force to reuse these folders", file=sys.stderr)
        return 2
    todo = [spec for spec, (action, _) in zip(specs, plans, strict=True) if action == "run"]
    for spec, (action, reason) in zip(specs, plans, strict=True):
        verb = "would run" if args.dry_run and action == "run" else action
        print(f"  p={spec.p:g}  {Path(spec.run_dir).name}: {verb} ({reason})")
    if launcher != "inprocess":
        run_dirs = [Path(s.run_dir) for s in specs]
        warning = launch.time_limit_warning(configs[0], res, run_dirs, args.preset)
        if warning:
            print(warning, file=sys.stderr)
    if todo:
        print(launch.describe_submission(res, launcher, len(todo)))
    if args.dry_run:
        print("dry run: nothing submitted, nothing written")
        return 0
    if launcher == "slurm" and todo:
        try:
            launch.validate_slurm(res)  # a bad partition/account/QoS fails here, before any folder is written
        except ValueError as e:
            parser.error(str(e))

    launch.write_manifest(
        out,
        task,
        args.preset,
        overrides,
        specs,
        launcher=launcher,
        testbed_dir=testbed_dir,
    )
    for spec in todo:
        launch.update_state(Path(spec.run_dir), state="pending", p=spec.p, task=spec.task, config_hash=spec.config_hash)

    t0 = time.perf_counter()
    if launcher == "slurm":
        if not todo:
            print("nothing to submit: every point is finished or already queued")
        else:
            ids = launch.submit_slurm(todo, res, launch.job_folder(out), args.max_requeues)
            print(f"submitted Slurm job array {ids[0].split('_')[0]}: {', '.join(ids)}")
        if not args.wait:
            print(f"follow with: {Path(sys.argv[0]).name} status --out {out}")
            return 0
        if todo:
            try:
                launch.wait_slurm(ids, args.wait_timeout)
            except TimeoutError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    elif launcher == "local":
        launch.run_local(todo, res, launch.job_folder(out), args.max_requeues)
    else:
        launch.run_inprocess(todo)
    elapsed = time.perf_counter() - t0
    return _summarize(task, args, out, specs, elapsed)


def _summarize(task, args: argparse.Namespace, out: Path, specs: list, elapsed: float) -> int:
    """Print the results table and the report paths; 1 when a point did not finish."""
    from experiments.launch import format_status, maybe_write_report, status_rows

    runs, unfinished = [], []
    for spec in specs:
        metrics_file = Path(spec.run_dir) / "metrics.json"
        if metrics_file.exists():
            runs.append({**json.loads(metrics_file.read_text()), "p": spec.p, "label": f"p={spec.p:g}"})
        else:
            unfinished.append(spec)
    if unfinished:
        print(format_status(status_rows(out)))
        print(f"\n{len(unfinished)} point(s) did not finish; see state.json and {out}/.submitit/", file=sys.stderr)
        return 1
    notice = task.notice if any("notice" in r for r in runs) else None
    print()
    print(task.format_table(runs))
    if notice:
        print(f"\n{notice}")
    paths = maybe_write_report(out)
    if paths:
        print("\nreport: " + ", ".join(str(p) for p in paths.values()))
    print(f"\ndone in {elapsed / 60:.1f} min; run folders under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
