"""Training throughput: clip_train vs open_clip_train.main on the same shards, model, batch and precision.

Fairness. Both trainers run as subprocesses with the same shards, model, batch size, precision,
DataLoader workers, intra-op threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and
``torch.set_num_threads``), learning-rate schedule, log cadence and logger (TensorBoard), one
optimizer step per batch. Neither writes a checkpoint inside the measured steps. The runs
alternate in ABBA order (ours, theirs, theirs, ours, ...) so that a drift in the load of a shared
machine favours neither.

Timing. Both are timed by the same code, not by their own logs: a global optimizer step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``), installed in both subprocesses,
records the wall clock and the CPU time (trainer process plus its DataLoader workers) after every
optimizer step. A step's time therefore includes everything between two optimizer steps: waiting
for data, forward/backward, logging. The first ``--skip-steps`` steps (start-up, worker spawn,
shuffle-buffer fill) are left out. Per run it reports the median step (primary on CPU: robust to
bursts of load from other processes), the mean over the window (primary on CUDA, where the
edges of the window are synchronised and single steps are asynchronous), and samples per
CPU-second (the work per sample, nearly independent of how much CPU other processes take).
Load from other processes only ever slows a run down, so the headline compares the best run of
each trainer (the same number of runs each, alternated); the median of the adjacent (ours, theirs)
pairs' ratios and the samples per CPU-second are printed beside it as cross-checks. The last line
is ``ratio_vs_open_clip=X`` (ours / open_clip in the primary rate; target X >= 1).

MFU. The model's training FLOPs per image-text pair are counted with ``FlopCounterMode`` over one
forward and backward on the meta device (``benchmarks/mfu.py``; model FLOPs, so gradient checkpointing's
recomputation is not counted); MFU = samples/s x FLOPs per sample / peak, with the peak from
``--peak-tflops`` or the GPU's name (H100 SXM/H200 989, A100 312 dense bf16 TFLOP/s). Without a peak
(CPU, an unlisted GPU) MFU is printed as ``n/a``.

    python benchmarks/clip_train_throughput.py --repeats 3 --steps 40   # CPU, EmbeddedCLIP-Tiny, embedded testbed
    python benchmarks/clip_train_throughput.py --model ViT-B-32-quickgelu --batch-size 512 \\
        --precision amp_bf16 --device cuda --workers 8 --steps 200 --skip-steps 50 --threads 0

open_clip_train 3.3.0 expects webdataset <= 0.2.86, whose tar expander yields no end-of-shard
marker; webdataset 1.0.2 yields ``{}``, which open_clip's ``group_by_keys_nothrow`` rejects
(KeyError 'fname'). The wrapper below passes ``eof_value=None`` to webdataset's own expander
(no fork) and registers our model configs before calling ``open_clip_train.main.main(argv)``.
``open_clip_train.data`` imports pandas for its CSV datasets only; where pandas is not installed
the wrapper stands in an empty module (the webdataset path never touches it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "testbed" / "model_configs"

# Run first in both subprocesses: thread settings and the step timer (identical for both trainers).
STEP_TIMER = """
import json, os, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_BENCH = json.loads(os.environ["CLIP_BENCH"])
if _BENCH["threads"]:
    torch.set_num_threads(_BENCH["threads"])
_TICK = os.sysconf("SC_CLK_TCK")
_steps, _children = [], [0]

def _children_cpu():
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            pids += open(f"/proc/self/task/{task}/children").read().split()
        except OSError:
            pass
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    _children[0] = max(_children[0], len(pids))
    return total

def _on_step(*_):
    if len(_steps) + 1 in (_BENCH["skip"], _BENCH["steps"]) and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the window's edges see all queued work
    _steps.append((time.perf_counter(), time.process_time() + _children_cpu()))

register_optimizer_step_post_hook(_on_step)

def _dump():
    record = {"steps": _steps, "threads": torch.get_num_threads(), "children": _children[0]}
    with open(_BENCH["out"], "w") as f:
        json.dump(record, f)
"""

OPEN_CLIP_WRAPPER = (
    STEP_TIMER
    + f"""
import functools, importlib.machinery, types
try:
    import pandas
except ImportError:  # only open_clip's CSV dataset uses it
    sys.modules["pandas"] = types.ModuleType("pandas")
    sys.modules["pandas"].__spec__ = importlib.machinery.ModuleSpec("pandas", None)
import open_clip
open_clip.add_model_config({str(MODEL_CONFIGS)!r})
import open_clip_train.data as data
from webdataset.tariterators import tar_file_expander
data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)  # wds 1.0 end-of-shard marker
from open_clip_train.main import main
try:
    main(sys.argv[1:])
finally:
    _dump()
"""
)

OURS_WRAPPER = (
    STEP_TIMER
    + """
from clip_train.config import load_config
from clip_train.train import train
args = json.loads(sys.argv[1])
cfg = load_config("embedded", args["overrides"])
try:
    train(cfg, args["run_dir"], args["shards"], num_samples=args["num_samples"])
finally:
    _dump()
"""
)


def run_trainer(cmd: list[str], args: argparse.Namespace, out: Path, name: str) -> dict:
    """Run one trainer; return its step timer's record."""
    bench = {"threads": args.threads, "skip": args.skip_steps, "steps": args.steps, "out": str(out)}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "CLIP_BENCH": json.dumps(bench)}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        raise RuntimeError(f"{name} failed:\n{res.stdout[-3000:]}")
    record = json.loads(out.read_text())
    if len(record["steps"]) != args.steps:
        raise RuntimeError(f"{name} made {len(record['steps'])} optimizer steps, expected {args.steps}")
    return record


def run_ours(args: argparse.Namespace, shards: str, work: Path, rep: int) -> dict:
    overrides = {
        "model": args.model,
        "batch_size": args.batch_size,
        "samples_seen": args.batch_size * args.steps,
        "precision": args.precision,
        "workers": args.workers,
        "lr": args.lr,
        "warmup_steps": 2,
        "log_every": args.log_every,
        "logger": "tensorboard",
        "checkpoint_every": 10**9,  # one checkpoint at the end, after the last measured step
        "shuffle_buffer": args.shuffle_buffer,
        "device": args.device,
        "grad_checkpointing": args.grad_checkpointing,
        "torch_compile": args.torch_compile,
    }
    payload = {
        "overrides": overrides,
        "run_dir": str(work / f"ours-{rep}"),
        "shards": shards,
        "num_samples": args.batch_size * args.steps,
    }
    cmd = [sys.executable, "-c", OURS_WRAPPER, json.dumps(payload)]
    return run_trainer(cmd, args, work / f"ours-{rep}.json", "clip_train")


def run_open_clip(args: argparse.Namespace, shards: str, work: Path, rep: int) -> dict:
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
        "--save-frequency", "0",  # one checkpoint at the end of the epoch, after the last measured step
        "--report-to", "tensorboard",
        "--local-loss",
        "--gather-with-grad",
    ]  # fmt: skip
    if args.device:
        argv += ["--device", args.device]
    if args.grad_checkpointing:
        argv += ["--grad-checkpointing"]
    if args.torch_compile:
        argv += ["--torchcompile"]
    cmd = [sys.executable, "-c", OPEN_CLIP_WRAPPER, *argv]
    return run_trainer(cmd, args, work / f"open_clip-{rep}.json", "open_clip_train")


def rates(record: dict, args: argparse.Namespace) -> dict[str, float]:
    """samples/s from the median step and from the window's mean, and samples per CPU-second,
    over steps skip+1 .. steps."""
    pts = record["steps"][args.skip_steps - 1 :]  # after step skip, ..., after the last step
    walls = [b[0] - a[0] for a, b in zip(pts, pts[1:], strict=False)]
    n, bs = len(walls), args.batch_size
    if n < 3:
        raise RuntimeError("too few measured steps: increase --steps or lower --skip-steps")
    return {
        "median": bs / statistics.median(walls),
        "window": bs * n / (pts[-1][0] - pts[0][0]),
        "per_cpu_s": bs * n / max(pts[-1][1] - pts[0][1], 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="brace pattern; default: the embedded testbed's train shards")
    parser.add_argument("--model", default="EmbeddedCLIP-Tiny")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (one process each)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both (0: leave as is)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-steps", type=int, default=10, help="start-up steps left out of the rate")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="ours; open_clip's is fixed (1000 initial)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, in ABBA order")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense) for MFU, e.g. 989")
    args = parser.parse_args(argv)
    if not 1 <= args.skip_steps <= args.steps - 3:
        parser.error("--skip-steps must be at least 1 and leave at least 3 measured steps")

    shards = args.shards
    if shards is None:
        sys.path.insert(0, str(REPO))
        from testbed import ensure_testbed

        shards = ensure_testbed().train_shards
    on_cuda = args.device == "cuda" or (args.device is None and _cuda_available())
    primary = "window" if on_cuda else "median"
    print(
        f"model={args.model} batch={args.batch_size} precision={args.precision} workers={args.workers} "
        f"threads={args.threads or 'default'} steps={args.steps} (first {args.skip_steps} left out) "
        f"primary={primary} shards={shards}"
    )
    runners = {"clip_train": run_ours, "open_clip_train": run_open_clip}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory(prefix="clip_train_bench_") as tmp:
        work = Path(tmp)
        for rep in range(args.repeats):
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                load = os.getloadavg()[0]
                record = runners[name](args, shards, work, rep)
                r = rates(record, args)
                results[name].append(r)
                print(
                    f"run {rep}: {name:<15} median-step {r['median']:6.1f} samples/s, window {r['window']:6.1f}, "
                    f"{r['per_cpu_s']:6.1f} samples/cpu-s (threads={record['threads']}, "
                    f"worker processes={record['children']}, load {load:.1f}->{os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    ours, theirs = results["clip_train"], results["open_clip_train"]
    for stat in ("median", "window", "per_cpu_s"):
        best_a, best_b = max(a[stat] for a in ours), max(b[stat] for b in theirs)
        paired = statistics.median(a[stat] / b[stat] for a, b in zip(ours, theirs, strict=True))
        print(
            f"{stat:<9}: best run clip_train {best_a:6.1f}, open_clip_train {best_b:6.1f}, "
            f"ratio {best_a / best_b:.3f}; median of paired ratios {paired:.3f}"
        )
    best_a, best_b = max(a[primary] for a in ours), max(b[primary] for b in theirs)
    print(f"clip_train_samples_per_s={best_a:.1f}")
    print(f"open_clip_train_samples_per_s={best_b:.1f}")
    print_mfu(args, on_cuda, {"clip_train": best_a, "open_clip_train": best_b})
    print(f"ratio_vs_open_clip={best_a / best_b:.3f}")
    return 0


def print_mfu(args: argparse.Namespace, on_cuda: bool, rates: dict[str, float]) -> None:
    """FLOPs per sample (counted), the peak used, and MFU per trainer (n/a without a peak)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.mfu import clip_flops_per_sample, gpu_name, mfu_pct, peak_tflops

    flops = clip_flops_per_sample(args.model)
    name = gpu_name() if on_cuda else None
    peak = peak_tflops(name, args.peak_tflops) if (on_cuda or args.peak_tflops) else None
    print(f"device_name={name or 'cpu'}")
    print(f"train_gflops_per_sample={flops / 1e9:.2f}")
    print(f"peak_tflops={peak if peak else 'n/a'}")
    for trainer, rate in rates.items():
        mfu = mfu_pct(rate, flops, peak)
        print(f"{trainer}_mfu_pct={f'{mfu:.1f}' if mfu is not None else 'n/a'}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
