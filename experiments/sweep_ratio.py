"""Sweep the synthetic-caption ratio p: train and evaluate one model per p, then report.

    python experiments/sweep_ratio.py --task clip --p 0.15
    python experiments/sweep_ratio.py --task clip --p 0,0.15,0.5,1.0 --out runs/sweep1

With no other flag it uses the embedded preset and testbed (built on first use, then cached).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from caption_mixing.mixing import parse_p_list  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from clip_train.config import list_presets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["clip"], default="clip", help="what to train and evaluate")
    parser.add_argument("--p", default="0.15", help="synthetic-caption ratio, or a comma list like 0,0.15,1.0")
    parser.add_argument("--preset", default="embedded", help=f"one of {', '.join(list_presets())} or a YAML file")
    parser.add_argument("--out", default="runs", help="sweep folder; one run folder per p goes inside")
    parser.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    parser.add_argument("--testbed-dir", default=None, help="where the embedded testbed is built/cached")
    parser.add_argument("--force", action="store_true", help="re-run points even if finished or made by another config")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ps = parse_p_list(args.p, "--p")
    except ValueError as e:
        parser.error(str(e))

    from clip_train.config import load_config, parse_overrides
    from clip_train.experiment import TESTBED_NOTICE, run_point
    from eval.report import format_table, write_sweep_report

    try:
        overrides = parse_overrides(args.overrides)
        if "p" in overrides:
            parser.error("--set p=... is not allowed; use --p")
        configs = [load_config(args.preset, {**overrides, "p": p}) for p in ps]
    except ValueError as e:
        parser.error(str(e))

    out = Path(args.out)
    runs = []
    t0 = time.perf_counter()
    for cfg in configs:
        print(f"=== {args.task} p={cfg.p:g} ({len(runs) + 1}/{len(configs)})", flush=True)
        metrics = run_point(cfg, out, testbed_dir=args.testbed_dir, force=args.force)
        runs.append({**metrics, "p": cfg.p, "label": f"p={cfg.p:g}"})
    elapsed = time.perf_counter() - t0

    notice = TESTBED_NOTICE if any("notice" in r for r in runs) else None
    print()
    print(format_table(runs))
    if notice:
        print(f"\n{notice}")
    if len(runs) > 1:
        paths = write_sweep_report(runs, out, title=f"Caption-mixing sweep ({args.task}, {args.preset})", notice=notice)
        print("\nreport: " + ", ".join(str(p) for p in paths.values()))
    print(f"\ndone in {elapsed / 60:.1f} min; run folders under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
