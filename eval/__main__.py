"""``python -m eval {tasks,prepare,zeroshot,report,score,modes,judge,geneval-metadata}``: the evaluation CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caption_mixing.paths import check_output_dir

if TYPE_CHECKING:
    from eval.tasks import Task


def _cmd_tasks(args: argparse.Namespace) -> int:
    from eval.task_table import format_registry

    print(format_registry(args.dataset_root, args.prompts))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from eval.prepare import prepare

    info = prepare(args.task, args.source, check_output_dir(args.out, "--out"))
    print(json.dumps({k: v for k, v in info.items() if k != "missing_videos"}))
    print(f"wrote {args.out}")
    return 0


def _zeroshot_tasks(args: argparse.Namespace) -> list[Task]:
    """--tasks and --extra-task through the one parser; fails on typos and bad names before anything runs."""
    from eval.tasks import parse_task_spec, unique_tasks

    extra = [t for spec in args.extra_task for t in parse_task_spec(spec, "--extra-task")]
    spec = args.tasks if args.tasks is not None else ("" if extra else "paper26")
    return unique_tasks([*(parse_task_spec(spec) if spec else []), *extra], "--tasks/--extra-task")


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    import torch

    from caption_mixing.atomic import atomic_write_json
    from eval.classifier_cache import ClassifierCache
    from eval.model_loading import load_model
    from eval.preflight import check_tasks
    from eval.results import metrics_document
    from eval.runner import run_suite

    tasks = _zeroshot_tasks(args)
    out = check_output_dir(args.out, "--out")
    cache_dir = check_output_dir(args.cache_dir, "--cache-dir") if args.cache_dir else out / "classifier_cache"
    if not Path(args.dataset_root).is_dir():
        raise ValueError(f"--dataset-root {args.dataset_root}: not a folder")
    checked = check_tasks(
        tasks, args.dataset_root, keep_going=args.keep_going, download=args.download, prompts=args.prompts
    )
    for problem in checked:
        print(f"warning: {problem}", file=sys.stderr)  # only with --keep-going; otherwise it raised
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, preprocess, model_id = load_model(
        args.model, args.checkpoint, device=device, config_dir=args.model_config_dir
    )
    precision = "amp" if args.amp else "fp32"  # a classifier computed under AMP is cached apart from an fp32 one
    res = run_suite(
        model,
        tokenizer,
        preprocess,
        tasks,
        args.dataset_root,
        cache=ClassifierCache(f"{model_id}@{precision}", cache_dir),
        out_dir=out,
        device=device,
        amp=args.amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        download=args.download,
        keep_going=args.keep_going,
        prompts=args.prompts,
    )
    meta = {
        "model": args.model,
        "checkpoint": str(args.checkpoint),
        "model_id": model_id,
        "dataset_root": str(args.dataset_root),
        "device": device,
        "precision": precision,
        "prompts": args.prompts,
    }
    atomic_write_json(out / "summary.json", {**meta, **res["summary"]})  # strict JSON: NaN -> null
    if args.p is not None:
        label = args.label or f"p={args.p:g}"
        atomic_write_json(out / "metrics.json", metrics_document(res, p=args.p, label=label, **meta))
    _print_summary(res["summary"])
    print(f"wrote {out / 'summary.json'} and {out / 'tasks'}/*.json")
    return 1 if res["summary"]["errors"] else 0


def _print_summary(s: dict[str, Any]) -> None:
    line = (
        f"average {100 * s['average']:.2f} (avg over {s['average_over']} tasks)"
        if s["num_tasks_averaged"]
        else "no task ran"
    )
    if "paper26" in s and s["paper26"]["num_tasks_averaged"]:
        line += f"; 26-task average {100 * s['paper26']['average']:.2f} (avg over {s['paper26']['average_over']})"
    elif "paper26" in s:
        line += "; none of the 26 tasks ran"
    print(line)
    for group, info in s["datacomp_groups"].items():
        if info["num_members"]:
            print(f"DataComp {group}: {100 * info['average']:.2f} (over {info['coverage']} members)")


def _cmd_report(args: argparse.Namespace) -> int:
    from eval.paper_report import load_runs, write_report

    out = check_output_dir(args.out, "--out") if args.out else Path(args.runs_dir) / "report"
    runs = load_runs(args.runs_dir)
    paths = write_report(runs, out, baseline=args.baseline, title=args.title, notice=args.notice)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from eval.score import run_score_cli

    print(json.dumps(run_score_cli(args)))
    return 0


def _cmd_modes(args: argparse.Namespace) -> int:
    from eval.report import load_run, write_mode_report

    root = Path(args.runs_dir)
    runs = [load_run(d) for d in sorted(root.iterdir()) if (d / "metrics.json").is_file()] if root.is_dir() else []
    if not runs:
        raise ValueError(f"{args.runs_dir}: no run folders with metrics.json")
    out = check_output_dir(args.out, "--out") if args.out else root / "report"
    for kind, path in write_mode_report(runs, out, title=args.title, notice=args.notice).items():
        print(f"{kind}: {path}")
    return 0


def _score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="per-sample image-text cosine of an open_clip model, for mix_mode=gate")
    p.add_argument("--shards", required=True, help="brace pattern of WebDataset shards ('::' joins patterns)")
    p.add_argument("--sources", default="alt", help="comma list of caption sources to score (alt = the .txt)")
    p.add_argument("--model", required=True, help="open_clip model name of the scorer")
    p.add_argument("--checkpoint", required=True, help="the scorer's checkpoint (never the gated run's own model)")
    p.add_argument("--model-config-dir", default=None, help="folder of extra open_clip model config JSONs")
    p.add_argument("--sidecar-dir", default=None, help="where the caption sidecars are (default: beside the shards)")
    p.add_argument("--out", default=None, help="where score sidecars go (default: beside the shards)")
    p.add_argument("--name", default="clip_score", help="field name; sidecars are <stem>.<name>_<source>.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("modes", help="mixing modes (random, gate, both) at equal p: modes.md and modes_vs_p.png")
    p.add_argument("runs_dir", help="folder of run folders, each with metrics.json (labels name the mode)")
    p.add_argument("--out", default=None, help="default RUNS_DIR/report")
    p.add_argument("--title", default="Mixing modes at equal p")
    p.add_argument("--notice", default=None, help="a line printed under the title (e.g. 'testbed numbers')")
    p.set_defaults(func=_cmd_modes)


def _cmd_judge(args: argparse.Namespace) -> int:
    from eval.judge import DEFAULT_STEPS, load_judge, train_judge

    out, steps = check_output_dir(args.out, "--out"), args.steps or DEFAULT_STEPS
    card = load_judge(train_judge(out, args.resolution, args.seed, steps, real_shards=args.real_shards)).card
    for key in ("accuracy_real", "accuracy_noise", "chance"):
        print(f"{key}: " + ", ".join(f"{h} {100 * v:.1f}" for h, v in card[key].items()))
    print(f"wrote {Path(args.out) / 'judge.safetensors'} and judge.json ({card['train']['seconds']} s)")
    return 0


def _cmd_geneval_metadata(args: argparse.Namespace) -> int:
    from eval.geneval import write_metadata
    from testbed.geneval import NOT_APPLICABLE, geneval_metadata

    records = geneval_metadata(args.seed, args.per_tag)
    print(f"wrote {write_metadata(records, Path(args.out))}: {len(records)} GenEval records")
    for tag, reason in NOT_APPLICABLE.items():
        print(f"  {tag}: n/a ({reason})")
    return 0


def _geneval_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="train the GenEval-style testbed judge (category/colour/count CNN) and its card")
    p.add_argument("--out", required=True, help="folder for judge.safetensors and judge.json")
    p.add_argument("--resolution", type=int, default=32, help="input resolution (the generator's; default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default eval.judge.DEFAULT_STEPS)")
    p.add_argument("--real-shards", default=None, help="also measure on these built testbed shards' stored labels")
    p.set_defaults(func=_cmd_judge)

    p = sub.add_parser("geneval-metadata", help="write the testbed's GenEval evaluation_metadata.jsonl")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--seed", type=int, default=0, help="order of each tag's records")
    p.add_argument("--per-tag", type=int, default=None, help="records per tag (default: all distinct ones)")
    p.set_defaults(func=_cmd_geneval_metadata)


def _prompts_flag(p: argparse.ArgumentParser) -> None:
    from eval.prompts import PROMPT_SOURCES

    p.add_argument(
        "--prompts",
        choices=PROMPT_SOURCES,
        default=PROMPT_SOURCES[0],
        help="class names and templates: metaclip (MetaCLIP's clipeval, the paper's; default) or clip_benchmark "
        "(the data folder's files, then clip_benchmark's lists: compare with numbers published through it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tasks", help="print the task registry: metric, split, expected count, prompts, where data is looked for"
    )
    p.add_argument("--dataset-root", default=None, help="show paths under this root")
    _prompts_flag(p)
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("prepare", help="convert a dataset from its original layout to a local wds folder")
    p.add_argument("task", help="cub, sun397, ucf101, kinetics700, hateful_memes or winogavil")
    p.add_argument("--source", required=True, help="the dataset in its original layout")
    p.add_argument("--out", required=True, help="output folder, normally DATASET_ROOT/wds_<task>")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("zeroshot", help="evaluate one checkpoint on a task list")
    p.add_argument("--checkpoint", required=True, help="open_clip checkpoint file (state_dict)")
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32-quickgelu")
    p.add_argument("--model-config-dir", default=None, help="folder of extra open_clip model config JSONs")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list of groups (paper26, retrieval, datacomp, testbed), registry names and NAME=PATH "
        "folders (default paper26, or none when --extra-task is given)",
    )
    p.add_argument(
        "--extra-task",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate a local wds folder (repeatable); a registry NAME keeps its registry metric",
    )
    p.add_argument("--dataset-root", required=True, help="folder holding wds_<name> (and builder) dataset folders")
    p.add_argument("--out", required=True, help="output folder for tasks/*.json and summary.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast (mixed precision); default fp32, as MetaCLIP evaluates")
    _prompts_flag(p)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="classifier cache (default OUT/classifier_cache)")
    p.add_argument("--download", action="store_true", help="let clip_benchmark builders download missing data")
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="evaluate what can be: tasks failing the up-front check are listed as missing/error, not fatal",
    )
    p.add_argument("--p", type=float, default=None, help="also write OUT/metrics.json for reports, with this p")
    p.add_argument("--label", default=None, help="run label in reports (default p=<p>)")
    p.set_defaults(func=_cmd_zeroshot)

    p = sub.add_parser("report", help="Table 6 / Table 7 / Figure 4 for a sweep folder")
    p.add_argument("runs_dir", help="folder of run folders, each with metrics.json")
    p.add_argument("--out", default=None, help="default RUNS_DIR/report")
    p.add_argument("--baseline", default=None, help="label of the row deltas are taken against")
    p.add_argument("--title", default="Caption-mixing sweep")
    p.add_argument("--notice", default=None, help="a line printed under the title (e.g. 'testbed numbers')")
    p.set_defaults(func=_cmd_report)
    _score_parser(sub)
    _geneval_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
