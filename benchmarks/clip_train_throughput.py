"""Training throughput: clip_train vs open_clip_train.main on the same shards, model, batch and precision.

Both trainers run as subprocesses, alternately, ``--repeats`` times: the same shards, model, batch
size, precision, DataLoader workers and intra-op threads. Steady state is the median of the
per-window samples/s after the first ``--skip-steps`` steps (start-up, worker spawn, shuffle-buffer
fill excluded); the best run of each trainer is compared so that noise from other processes on a
shared machine favours neither. Windows are wall-clock: ours from its train_log.jsonl (perf_counter
per log window), open_clip's from the arrival time of its "Train Epoch" log lines and their sample
counters (its own printed rate is the last batch only).

    python benchmarks/clip_train_throughput.py                        # CPU, EmbeddedCLIP-Tiny, embedded testbed
    python benchmarks/clip_train_throughput.py --model ViT-B-32-quickgelu --batch-size 256 \\
        --precision amp_bf16 --device cuda --workers 8 --steps 200 --skip-steps 50 --threads 0

open_clip_train 3.3.0 expects webdataset <= 0.2.86, whose tar expander yields no end-of-shard
marker; webdataset 1.0.2 yields ``{}``, which open_clip's ``group_by_keys_nothrow`` rejects
(KeyError 'fname'). The wrapper below passes ``eof_value=None`` to webdataset's own expander
(no fork) and registers our model configs before calling ``open_clip_train.main.main(argv)``.

Prints samples/s for both and, last, ``ratio_vs_open_clip=X`` (ours / open_clip; target X >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "clip_train" / "model_configs"

OPEN_CLIP_WRAPPER = f"""
import functools, sys
import open_clip
open_clip.add_model_config({str(MODEL_CONFIGS)!r})
import open_clip_train.data as data
from webdataset.tariterators import tar_file_expander
data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)  # wds 1.0 end-of-shard marker
from open_clip_train.main import main
main(sys.argv[1:])
"""

OURS_RUNNER = """
import json, sys
from clip_train.config import load_config
from clip_train.train import train
args = json.loads(sys.argv[1])
cfg = load_config("embedded", args["overrides"])
train(cfg, args["run_dir"], args["shards"], num_samples=args["num_samples"])
"""

OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")


def steady_rate(points: list[tuple[int, float]], skip_samples: int) -> tuple[float, int]:
    """Median samples/s over windows between (samples, time) points past ``skip_samples``; (rate, windows)."""
    pts = [p for p in points if p[0] >= skip_samples]
    rates = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(pts, pts[1:], strict=False) if b[1] > a[1]]
    if not rates:
        raise RuntimeError(f"too few log windows after {skip_samples} samples: increase --steps")
    return statistics.median(rates), len(rates)


def env_for(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_ours(args: argparse.Namespace, shards: str, work: Path, rep: int) -> float:
    run_dir = work / f"ours-{rep}"
    overrides = {
        "model": args.model,
        "batch_size": args.batch_size,
        "samples_seen": args.batch_size * args.steps,
        "precision": args.precision,
        "workers": args.workers,
        "lr": args.lr,
        "warmup_steps": 2,
        "log_every": args.log_every,
        "checkpoint_every": 10**9,  # one checkpoint at the end, after the last measured window
        "shuffle_buffer": args.shuffle_buffer,
        "device": args.device,
        "grad_checkpointing": args.grad_checkpointing,
        "torch_compile": args.torch_compile,
    }
    payload = json.dumps(
        {"overrides": overrides, "run_dir": str(run_dir), "shards": shards, "num_samples": args.batch_size * args.steps}
    )
    cmd = [sys.executable, "-c", OURS_RUNNER, payload]
    res = subprocess.run(cmd, env=env_for(args), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"clip_train failed:\n{res.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    first = args.skip_steps + args.log_every  # the first window that starts after the skipped steps
    windows = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] >= first]
    if not windows:
        raise RuntimeError("too few log windows: increase --steps")
    return statistics.median(windows)


def run_open_clip(args: argparse.Namespace, shards: str, work: Path, rep: int) -> float:
    argv = [
        "--train-data", shards,
        "--train-num-samples", str(args.batch_size * args.steps),
        "--dataset-type", "webdataset",
        "--batch-size", str(args.batch_size),
        "--workers", str(args.workers),
        "--model", args.model,
        "--epochs", "1",
        "--lr", str(args.lr),
        "--warmup", "2",
        "--precision", args.precision,
        "--logs", str(work / "open_clip_logs"),
        "--name", f"rep{rep}",
        "--log-every-n-steps", str(args.log_every),
        "--save-frequency", "0",
        "--report-to", "",
        "--local-loss",
        "--gather-with-grad",
    ]  # fmt: skip
    if args.device:
        argv += ["--device", args.device]
    if args.grad_checkpointing:
        argv += ["--grad-checkpointing"]
    if args.torch_compile:
        argv += ["--torchcompile"]
    proc = subprocess.Popen(
        [sys.executable, "-c", OPEN_CLIP_WRAPPER, *argv],
        env=env_for(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    points, tail = [], []
    for line in proc.stdout:
        now = time.perf_counter()
        tail = (tail + [line])[-40:]
        m = OPEN_CLIP_LINE.search(line)
        if m:
            points.append((int(m.group(1)), now))
    if proc.wait():
        raise RuntimeError("open_clip_train failed:\n" + "".join(tail))
    rate, _ = steady_rate(points, (args.skip_steps + 1) * args.batch_size)
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="brace pattern; default: the embedded testbed's train shards")
    parser.add_argument("--model", default="EmbeddedCLIP-Tiny")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (one process each)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both (0: leave as is)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-steps", type=int, default=10, help="start-up steps left out of the rate")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="ours; open_clip's is fixed (1000 initial)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    shards = args.shards
    if shards is None:
        sys.path.insert(0, str(REPO))
        from caption_mixing.testbed import ensure_testbed

        shards = ensure_testbed().train_shards
    print(
        f"model={args.model} batch={args.batch_size} precision={args.precision} workers={args.workers} "
        f"threads={args.threads or 'default'} steps={args.steps} (first {args.skip_steps} left out) shards={shards}"
    )
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="clip_train_bench_") as tmp:
        work = Path(tmp)
        for rep in range(args.repeats):
            ours.append(run_ours(args, shards, work, rep))
            print(f"run {rep}: clip_train {ours[-1]:.1f} samples/s", flush=True)
            theirs.append(run_open_clip(args, shards, work, rep))
            print(f"run {rep}: open_clip_train {theirs[-1]:.1f} samples/s", flush=True)
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"clip_train_samples_per_s={best_ours:.1f}")
    print(f"open_clip_train_samples_per_s={best_theirs:.1f}")
    print(f"ratio_vs_open_clip={best_ours / best_theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
