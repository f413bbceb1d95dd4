"""Train and evaluate one CLIP run: ``python -m clip_train --preset vit-b-32 --set k=v --out DIR``.

Launch one process per GPU with torchrun (``torchrun --nproc-per-node 8 -m clip_train ...``) or
srun; the same command started again continues from the run's last checkpoint. After
SIGTERM/SIGUSR1/SIGUSR2 it writes a checkpoint and exits with status 75 (EX_TEMPFAIL) so a wrapper can requeue.
"""

from __future__ import annotations

import argparse
import json
import sys

from caption_mixing.paths import check_output_dir
from clip_train.config import list_presets, load_config, parse_overrides

PREEMPTED_EXIT_CODE = 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded", help=f"one of {', '.join(list_presets())} or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--out", required=True, help="folder that holds the run folder")
    parser.add_argument("--testbed-dir", default=None, help="embedded testbed folder (built if missing)")
    parser.add_argument("--force", action="store_true", help="reuse a run folder made by another config")
    args = parser.parse_args(argv)
    try:
        out = check_output_dir(args.out, "--out")
        cfg = load_config(args.preset, parse_overrides(args.set))
    except ValueError as exn:
        parser.error(str(exn))

    from clip_train.experiment import run_point
    from training.distributed import cleanup
    from training.preemption import Preempted

    try:
        metrics = run_point(cfg, out, testbed_dir=args.testbed_dir, force=args.force)
    except Preempted as exn:
        print(f"preempted: {exn}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    finally:
        cleanup()
    if "summary" in metrics:
        print(json.dumps({"steps": metrics["steps"], "summary": metrics["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
