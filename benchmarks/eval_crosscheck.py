"""Evaluation on one device: our runner in fp32 against clip_benchmark's CLI in fp32, and what autocast changes.

Three runs on the same checkpoint and the embedded testbed's eval sets, each as its users run it:
``python -m eval zeroshot`` in fp32 (the default) and with ``--amp``, and clip_benchmark's own CLI
(through ``eval.cb_launcher``, which swaps only its numpy-broken ``accuracy``) with ``--no_amp``, one
process per task. Compared metrics: top-1, top-5 and mean per-class recall for classification,
image and text recall@1/5/10 for retrieval. Printed as ``name=value`` lines:

- ``eval_crosscheck_max_abs_diff_pts``: ours fp32 vs clip_benchmark fp32, largest difference over
  tasks and metrics, in points; ``eval_crosscheck_ok=1`` when it is within 0.1 points (the tolerance
  of tests/test_eval_crosscheck.py).
- ``eval_amp_max_abs_dev_pts`` / ``eval_amp_mean_abs_dev_pts``: ours under autocast vs ours fp32, the
  deviation mixed precision shows on this device (fp16 autocast on CUDA, bf16 on CPU).

Without ``--checkpoint`` a randomly initialised EmbeddedCLIP-Tiny (seed 0) is evaluated: the numbers
then sit near chance, but both tools must still agree on them.

    python benchmarks/eval_crosscheck.py --device cuda --checkpoint runs/.../checkpoints/step_00000020.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "EmbeddedCLIP-Tiny"
CLS_KEYS = ("acc1", "acc5", "mean_per_class_recall")
RET_KEYS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))
TOL_PTS = 0.1


def _run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run ``cmd`` from the repository root; its output goes to ``log``; return the seconds it took."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def random_checkpoint(path: Path) -> Path:
    """A seed-0 EmbeddedCLIP-Tiny state_dict (what eval_throughput.py uses)."""
    import open_clip
    import torch

    import testbed.models  # noqa: F401  (registers EmbeddedCLIP-Tiny)

    torch.manual_seed(0)
    torch.save(open_clip.create_model(MODEL).state_dict(), path)
    return path


def run_ours(args: argparse.Namespace, ckpt: Path, root: Path, out: Path, amp: bool) -> dict[str, dict]:
    # NAME=PATH folders under names of their own ("retrieval" is also a registry group)
    spec = ",".join(f"testbed_{name}={root / name}" for name in task_names(args))
    cmd = [sys.executable, "-m", "eval", "zeroshot", "--checkpoint", str(ckpt), "--model", args.model,
           "--tasks", spec, "--dataset-root", str(root), "--out", str(out), "--device", args.device,
           "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]  # fmt: skip
    if amp:
        cmd.append("--amp")
    seconds = _run(cmd, out.with_suffix(".log"), args.timeout)
    print(f"ours {'amp' if amp else 'fp32'}: {seconds:.1f} s", flush=True)
    return {name: json.loads((out / "tasks" / f"testbed_{name}.json").read_text()) for name in task_names(args)}


def run_clip_benchmark(args: argparse.Namespace, ckpt: Path, root: Path, out: Path) -> dict[str, dict]:
    from testbed.models import MODEL_CONFIG_DIR

    out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, 0.0
    for name in task_names(args):
        folder = root / name
        retrieval = (folder / "dataset_type.txt").is_file()
        task = "zeroshot_retrieval" if retrieval else "zeroshot_classification"
        cmd = [sys.executable, "-m", "eval.cb_launcher", "--model-config-dir", str(MODEL_CONFIG_DIR), "eval",
               "--dataset", f"wds/{name}", "--dataset_root", str(folder), "--task", task, "--model", args.model,
               "--pretrained", str(ckpt), "--output", str(out / f"{name}.json"), "--no_amp",
               "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
               "--recall_k", "1", "5", "10"]  # fmt: skip
        seconds += _run(cmd, out / f"{name}.log", args.timeout)
        results[name] = json.loads((out / f"{name}.json").read_text())["metrics"]
    print(f"clip_benchmark fp32: {seconds:.1f} s ({len(results)} processes)", flush=True)
    return results


def task_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def differences(a: dict[str, dict], b: dict[str, dict]) -> dict[str, float]:
    """|a - b| in points for every compared metric both sides report, keyed task/metric."""
    out = {}
    for name, res in a.items():
        for key in (*CLS_KEYS, *RET_KEYS):
            x, y = res.get(key), b[name].get(key)
            if isinstance(x, int | float) and isinstance(y, int | float):
                out[f"{name}/{key}"] = 100.0 * abs(x - y)
    if not out:
        raise SystemExit("no metric in common between the two runs: check the task names")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--checkpoint", default=None, help="open_clip checkpoint (default: a random EmbeddedCLIP-Tiny)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--tasks", default="concept,retrieval", help="testbed eval tasks (comma list)")
    ap.add_argument("--testbed-dir", default=None, help="embedded testbed folder (built if missing)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per command")
    ap.add_argument("--work-dir", default=None, help="folder for outputs and logs (default: a new temporary one)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from testbed import ensure_testbed

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = ensure_testbed(args.testbed_dir).root / "eval"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="eval_crosscheck-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"outputs and logs in {work}", flush=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(work / "random_init.pt")
    fp32 = run_ours(args, ckpt, root, work / "ours_fp32", amp=False)
    amp = run_ours(args, ckpt, root, work / "ours_amp", amp=True)
    cb = run_clip_benchmark(args, ckpt, root, work / "cb")
    cross, dev = differences(fp32, cb), differences(amp, fp32)
    worst = max(cross, key=cross.get)
    print(f"device={args.device} checkpoint={args.checkpoint or 'random init (seed 0)'} tasks={args.tasks}")
    for name, res in fp32.items():
        for key in ("acc1", "image_retrieval_recall@1"):
            if key in res:
                print(f"eval_fp32_{name}_{key.replace('@', '')}_pct={100 * res[key]:.2f}")
    print(f"eval_crosscheck_metrics={len(cross)}")
    print(f"eval_crosscheck_max_abs_diff_pts={cross[worst]:.3f}")
    print(f"eval_crosscheck_worst_metric={worst}")
    print(f"eval_amp_max_abs_dev_pts={max(dev.values()):.3f}")
    print(f"eval_amp_worst_metric={max(dev, key=dev.get)}")
    print(f"eval_amp_mean_abs_dev_pts={sum(dev.values()) / len(dev):.3f}")
    print(f"eval_crosscheck_ok={int(cross[worst] <= TOL_PTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
