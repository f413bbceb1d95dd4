"""Throughput: our zero-shot runner against clip_benchmark's CLI on the same model and local tasks.

Both run as their users run them, as fresh processes timed end to end: ours once for all tasks
(`python -m eval zeroshot`, model loaded once, classifiers computed once into an empty cache), clip_benchmark
once per task (through eval.cb_launcher, which only swaps its numpy>=2.4-broken ``accuracy``). Same
checkpoint (a randomly initialised EmbeddedCLIP-Tiny saved in open_clip format; throughput does not depend
on the weights), same batch size, workers and precision (fp32, --no_amp). Data: the embedded testbed's eval
sets. Prints images/s for both and, last, ``ratio_vs_clip_benchmark=X`` (ours / clip_benchmark).

Inside a task both run nearly the same code (clip_benchmark's wds reader and retrieval ``evaluate``; the
class-prompt classifier is ours, which encodes prompts in chunks across classes where clip_benchmark runs
one forward per class; the tasks are ad-hoc folders, so both score the folders' own prompts), so X is
mostly what one process saves: the interpreter start, the torch/open_clip imports and the model load that
the CLI repeats per task. X grows with the number of tasks and shrinks as tasks get larger; run on a quiet
machine for stable numbers.

    python benchmarks/eval_throughput.py [--batch-size 128] [--num-workers 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import open_clip
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "testbed" / "model_configs"  # read as data, for the --model-config-dir of both CLIs
MODEL = "EmbeddedCLIP-Tiny"


def count_images(folder: Path) -> int:
    """Samples in a wds test split, from tar headers (one image member per sample)."""
    split = folder / "test"
    n_shards = int((split / "nshards.txt").read_text())
    exts = (".jpg", ".jpeg", ".png", ".webp")
    n = 0
    for i in range(n_shards):
        with tarfile.open(split / f"{i}.tar") as tar:
            n += sum(1 for m in tar if m.name.lower().endswith(exts))
    return n


def is_retrieval(folder: Path) -> bool:
    f = folder / "dataset_type.txt"
    return f.is_file() and f.read_text().strip().lower() == "retrieval"


def save_random_checkpoint(path: Path) -> None:
    open_clip.add_model_config(CONFIG_DIR / f"{MODEL}.json")
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(MODEL)
    torch.save(model.state_dict(), path)


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return seconds


def run_ours(tasks: dict[str, Path], ckpt: Path, work: Path, batch_size: int, num_workers: int) -> float:
    cmd = [sys.executable, "-m", "eval", "zeroshot", "--checkpoint", str(ckpt), "--model", MODEL,
           "--model-config-dir", str(CONFIG_DIR), "--dataset-root", str(work), "--out", str(work / "ours"),
           "--cache-dir", str(work / "ours" / f"cache-{time.time_ns()}"), "--device", "cpu",
           "--batch-size", str(batch_size), "--num-workers", str(num_workers)]  # fmt: skip
    for name, folder in tasks.items():
        cmd += ["--extra-task", f"{name}={folder}"]
    return _run(cmd, work / "ours.log")


def run_clip_benchmark(tasks: dict[str, Path], ckpt: Path, work: Path, batch_size: int, num_workers: int) -> float:
    total = 0.0
    (work / "cb").mkdir(exist_ok=True)
    for name, folder in tasks.items():
        task = "zeroshot_retrieval" if is_retrieval(folder) else "zeroshot_classification"
        cmd = [sys.executable, "-m", "eval.cb_launcher", "--model-config-dir", str(CONFIG_DIR), "eval"]
        cmd += ["--dataset", f"wds/{name}", "--dataset_root", str(folder), "--task", task, "--model", MODEL]
        cmd += ["--pretrained", str(ckpt), "--output", str(work / "cb" / f"{name}.json"), "--no_amp"]
        cmd += ["--batch_size", str(batch_size), "--num_workers", str(num_workers), "--recall_k", "1", "5", "10"]
        total += _run(cmd, work / f"cb-{name}.log")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=1, help="data workers for both (local sets are 1 shard)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two tools this many times; best kept")
    args = ap.parse_args()

    from testbed import ensure_testbed

    tasks = dict(ensure_testbed().eval_tasks)
    sizes = {name: count_images(folder) for name, folder in tasks.items()}
    n_images = sum(sizes.values())
    print(f"tasks: {sizes} ({n_images} images); model {MODEL} (random init), batch {args.batch_size}, "
          f"workers {args.num_workers}, fp32, CPU threads {torch.get_num_threads()}")  # fmt: skip
    ours_s, cb_s = [], []
    with tempfile.TemporaryDirectory(prefix="eval_throughput-") as tmp:
        work = Path(tmp)
        ckpt = work / "random_init.pt"
        save_random_checkpoint(ckpt)
        for _ in range(args.repeats):
            ours_s.append(run_ours(tasks, ckpt, work, args.batch_size, args.num_workers))
            cb_s.append(run_clip_benchmark(tasks, ckpt, work, args.batch_size, args.num_workers))
        ours = json.loads((work / "ours" / "summary.json").read_text())
        if ours["num_tasks_averaged"] != len(tasks):
            raise SystemExit(f"our runner evaluated {ours['num_tasks_averaged']}/{len(tasks)} tasks")
        in_loop = sum(json.loads((work / "ours" / "tasks" / f"{t}.json").read_text())["seconds"] for t in tasks)
    best_ours, best_cb = min(ours_s), min(cb_s)
    print(f"ours (1 process, {len(tasks)} tasks): {best_ours:.1f} s, {n_images / best_ours:.1f} images/s "
          f"(last run: {in_loop:.1f} s inside the tasks, the rest start-up and model load)")  # fmt: skip
    print(f"clip_benchmark CLI ({len(tasks)} processes): {best_cb:.1f} s, {n_images / best_cb:.1f} images/s")
    print(f"ratio_vs_clip_benchmark={best_cb / best_ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
