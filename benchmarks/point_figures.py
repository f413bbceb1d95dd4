"""``name=value`` figures of one finished run folder (metrics.json + train_log.jsonl), for benchmarks/gpu_check.sh.

    python benchmarks/point_figures.py runs/clip-embedded-p0.15

Prints the steps trained, device, timings, the first and last logged loss and whether every logged
loss was finite, the checkpoint, and the headline metric (clip: the eval average; t2i: the CLIP
scores). A missing or unreadable metrics.json is an error naming the file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def figures(run_dir: Path) -> dict[str, object]:
    """Flat figures of a run folder; raises naming the file that is missing or malformed."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the run's metrics ({e})") from e
    out: dict[str, object] = {}
    for key in ("steps", "device", "world_size", "prepare_seconds", "train_seconds", "eval_seconds"):
        if key in metrics:
            out[key] = metrics[key]
    out["checkpoint"] = str(run_dir / metrics["checkpoint"]) if "checkpoint" in metrics else "none"
    summary = metrics.get("summary") or {}
    if isinstance(summary.get("average"), int | float):
        out["eval_average_pct"] = round(100 * summary["average"], 2)
    for kind, value in (metrics.get("clip_score") or {}).items():
        if isinstance(value, int | float):
            out[f"clip_score_{kind}"] = round(value, 3)
    log = run_dir / "train_log.jsonl"
    losses = []
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        out["first_loss"] = losses[0]
        out["last_loss"] = losses[-1]
    out["losses_logged"] = len(losses)
    out["losses_finite"] = int(bool(losses) and all(isinstance(x, int | float) and math.isfinite(x) for x in losses))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/point_figures.py RUN_DIR", file=sys.stderr)
        return 2
    try:
        values = figures(Path(args[0]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, value in values.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
