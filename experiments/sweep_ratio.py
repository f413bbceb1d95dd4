"""Sweep the synthetic-caption ratio p: train and evaluate one model per p, then report.

    python experiments/sweep_ratio.py --task clip --p 0.15          # or: caption-mixing-sweep ...
    python experiments/sweep_ratio.py --task clip --p 0,0.15,0.5,1.0 --out runs/sweep1
    python experiments/sweep_ratio.py --task clip --p 0,0.15,1.0 --seeds 0,1,2 --out runs/sweep3  # mean ± std
    python experiments/sweep_ratio.py --task clip --p 0,0.15,0.5,1.0 --out runs/s --launcher slurm \
        --partition gpu --time 12:00:00 --dry-run
    python experiments/sweep_ratio.py status --out runs/s

With no --launcher each point runs here, one after the other. --launcher slurm submits one Slurm
job array (a job per point, resources from the preset's ``job:`` block and the flags below); a point is one
(p, seed) pair, so ``--p 0,1 --seeds 0,1,2`` is 6 points, run folders ``<task>-<preset>-p<p>[-s<seed>]``
(seed 0 keeps the plain name) and a report with mean ± std over the seeds;
--launcher local runs submitit local jobs on this machine, at most one per free GPU set. Jobs run
from a snapshot of the code taken at submission (<out>/.code/). Run folders keep a state.json;
running the same sweep again skips finished points and resubmits failed or missing ones. With no
other flag it uses the embedded preset and testbed (built on first use, then cached).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import this checkout's packages, not experiments/'s modules as top-level ones
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from caption_mixing.mixing import parse_p_list  # noqa: E402
from caption_mixing.paths import check_output_dir  # noqa: E402
from caption_mixing.presets import parse_overrides  # noqa: E402
from experiments import resources, scheduler, snapshot, state, submit  # noqa: E402
from experiments.job import PointSpec  # noqa: E402
from experiments.status import format_status, maybe_write_report, status_rows  # noqa: E402
from experiments.tasks import TASKS, Task, get_task  # noqa: E402

COUNTS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "max_parallel", "signal_delay_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="clip", help="what to train and evaluate")
    parser.add_argument("--p", default="0.15", help="synthetic-caption ratio, or a comma list like 0,0.15,1.0")
    parser.add_argument(
        "--seeds",
        default=None,
        help="training seeds, a comma list like 0,1,2: every p runs once per seed and the report shows "
        "mean ± std (default: the preset's seed, or --set seed=N)",
    )
    parser.add_argument(
        "--preset", default="embedded", help="a preset of --task (clip_train/presets, t2i/presets) or a YAML file"
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
    g.add_argument("--nodes", type=int, help="nodes per job (default: the preset's job block)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the preset's job block)")
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


def status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sweep_ratio.py status", description="Show each run's state and job id.")
    parser.add_argument("--out", required=True, help="sweep folder")
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


def job_resources(args: argparse.Namespace, task: Task) -> resources.Resources:
    """The preset's job shape with the flags laid over it; ValueError names the flag or preset key."""
    res = resources.job_resources(task.preset_dir, args.preset)
    for flag in COUNTS:
        value = getattr(args, flag)
        if value is not None:
            if value < (0 if flag == "gpus_per_node" else 1):
                raise ValueError(f"--{flag.replace('_', '-')}: {value} is not a valid count")
            setattr(res, flag, value)
    for flag in ("mem_gb", "sec_per_step"):
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{flag.replace('_', '-')}: {value} must be positive")
            setattr(res, flag, value)
    if args.sec_per_step is not None:
        res.sec_per_step_source = resources.FLAG_SOURCE
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            setattr(res, key, getattr(args, key))
    if args.time is not None:
        res.time_min = resources.parse_time_min(args.time, "--time")
    res.extra = resources.parse_sbatch_extra(args.sbatch, "--sbatch")
    if args.max_requeues < 0:
        raise ValueError(f"--max-requeues: {args.max_requeues} must be >= 0")
    return res


def parse_seed_list(text: str | None, flag: str = "--seeds") -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (duplicates merged, order kept); None when the flag is absent."""
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",")]
    if not text.strip() or any(not t.isdigit() for t in items):
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of seeds (whole numbers >= 0) like 0,1,2")
    return list(dict.fromkeys(int(t) for t in items))


def point_specs(
    args: argparse.Namespace, task: Task, ps: list[float], out: Path, code: dict[str, Any]
) -> tuple[list, list[PointSpec]]:
    """(configs, specs): each (p, seed) point's config, resolved once here, and the job spec carrying its fields.

    Points are ordered p-major (every seed of the first p, then the next p), so the runs of one p finish together.
    """
    overrides = parse_overrides(args.overrides)
    if "p" in overrides:
        raise ValueError("--set p=... is not allowed; use --p")
    seeds = parse_seed_list(args.seeds)
    if seeds is not None and "seed" in overrides:
        raise ValueError("--set seed=... and --seeds both name the seed; use --seeds (e.g. --seeds 0,1,2)")
    points = [{"p": p} if seeds is None else {"p": p, "seed": seed} for p in ps for seed in (seeds or [None])]
    configs = [task.load_config(args.preset, {**overrides, **point}) for point in points]
    testbed_dir = str(Path(args.testbed_dir).resolve()) if args.testbed_dir else None
    specs = [
        PointSpec(
            task=task.name,
            config=task.config_dict(cfg),
            out=str(out),
            run_dir=str(task.run_dir_for(out, cfg)),
            config_hash=task.config_hash(cfg),
            testbed_dir=testbed_dir,
            force=args.force,
            max_requeues=args.max_requeues,
            workdir=os.getcwd(),
            code=code,
        )
        for cfg in configs
    ]
    return configs, specs


def plan(specs: list[PointSpec], dry_run: bool) -> list[PointSpec] | None:
    """Print each point's plan; the points to run, or None when a conflict anywhere stops the whole sweep."""
    plans = [submit.plan_point(spec) for spec in specs]
    conflicts = [reason for action, reason in plans if action == "conflict"]
    if conflicts:
        print("error: " + "\n       ".join(conflicts), file=sys.stderr)
        print("use another --out, or --force to reuse these folders", file=sys.stderr)
        return None
    for spec, (action, reason) in zip(specs, plans, strict=True):
        verb = "would run" if dry_run and action == "run" else action
        print(f"  p={spec.p:g} seed={spec.seed}  {Path(spec.run_dir).name}: {verb} ({reason})")
    return [spec for spec, (action, _) in zip(specs, plans, strict=True) if action == "run"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    launcher = args.launcher or "inprocess"
    if args.wait and launcher != "slurm":
        parser.error("--wait applies to --launcher slurm (local and in-process sweeps always wait)")
    try:
        out = check_output_dir(args.out, "--out").resolve()
        ps = parse_p_list(args.p, "--p")
        task = get_task(args.task)
        live = snapshot.describe()
        configs, specs = point_specs(args, task, ps, out, live.record())
        res = job_resources(args, task)
    except ValueError as e:
        parser.error(str(e))
    todo = plan(specs, args.dry_run)
    if todo is None:
        return 2
    if launcher != "inprocess":
        warning = resources.time_limit_warning(configs[0], res, [Path(s.run_dir) for s in specs])
        if warning:
            print(warning, file=sys.stderr)
    if todo:
        try:
            print(submit.describe_submission(res, launcher, len(todo)))
        except ValueError as e:  # e.g. --launcher local with more GPUs per job than this machine has
            parser.error(str(e))
        if launcher != "inprocess":
            what = f"commit {live.commit}" if live.commit else f"the code in {live.dir}"
            dirty = " with uncommitted changes" if live.dirty else ""
            print(f"  code: jobs run from a snapshot of {what}{dirty}, taken into {out / snapshot.SNAPSHOTS}/")
    if args.dry_run:
        print("dry run: nothing submitted, nothing written")
        return 0
    if launcher == "slurm" and todo:
        try:
            scheduler.validate_slurm(res, len(todo))  # a bad partition/account/QoS fails here, before any write
        except ValueError as e:
            parser.error(str(e))
    return launch(args, task, out, specs, todo, res, launcher)


def launch(
    args: argparse.Namespace,
    task: Task,
    out: Path,
    specs: list[PointSpec],
    todo: list[PointSpec],
    res: resources.Resources,
    launcher: str,
) -> int:
    """Write sweep.json and the pending states, snapshot the code for jobs, run or submit, then summarize."""
    code = snapshot.take(out) if launcher != "inprocess" and todo else snapshot.describe()
    if launcher != "inprocess":
        todo = [dataclasses.replace(spec, code=code.record()) for spec in todo]
    points = [{"p": s.p, "seed": s.seed, "run_dir": Path(s.run_dir).name, "config_hash": s.config_hash} for s in specs]
    overrides = parse_overrides(args.overrides)
    extra = {"launcher": launcher, "testbed_dir": specs[0].testbed_dir, "code": code.record()}
    state.write_manifest(out, task.name, args.preset, overrides, points, **extra)
    for spec in todo:
        state.update_state(
            Path(spec.run_dir), state="pending", p=spec.p, seed=spec.seed, task=spec.task, config_hash=spec.config_hash
        )
    t0 = time.perf_counter()
    if launcher == "slurm":
        if not todo:
            print("nothing to submit: every point is finished or already queued")
        ids = submit.submit_slurm(todo, res, submit.job_folder(out), code) if todo else []
        if ids:
            print(f"submitted Slurm job array {ids[0].split('_')[0]}: {', '.join(ids)}")
        if not args.wait:
            print(f"follow with: {Path(sys.argv[0]).name} status --out {out}")
            return 0
        try:
            scheduler.wait_slurm(ids, args.wait_timeout)
        except TimeoutError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    elif launcher == "local":
        submit.run_local(todo, res, submit.job_folder(out), code)
    else:
        submit.run_inprocess(todo)
    return summarize(task, out, specs, time.perf_counter() - t0)


def summarize(task: Task, out: Path, specs: list[PointSpec], elapsed: float) -> int:
    """Print the results table and the report paths; 1 when a point did not finish."""
    runs, unfinished = [], []
    for spec in specs:
        metrics_file = Path(spec.run_dir) / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            label = metrics.get("label") or f"p={spec.p:g}"  # the mode too: "p=0.15 gate", "both w=0.5"
            runs.append({**metrics, "p": spec.p, "seed": spec.seed, "label": label})
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
