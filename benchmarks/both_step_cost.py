"""CPU time of one CLIP training step, ``text_mode: mixed`` vs ``both`` (the text tower runs on 2B texts).

    OMP_NUM_THREADS=1 python benchmarks/both_step_cost.py [--batch-size 128] [--repeats 5]

One ``clip_train.step.forward_backward`` of EmbeddedCLIP-Tiny per measurement (fp32, 1 thread, after a
warm-up), the three settings interleaved; prints the medians and, last, ``both_step_cost_ratio=X``
(median over repeats of both_mean / mixed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from clip_train.config import load_config  # noqa: E402
from clip_train.model import create_model  # noqa: E402
from clip_train.step import forward_backward, make_loss  # noqa: E402
from training.distributed import DistEnv  # noqa: E402


def step_seconds(mode: str, loss_kind: str, images: torch.Tensor, alt: torch.Tensor, syn: torch.Tensor) -> float:
    """CPU seconds of one forward/backward (after a warm-up one) under ``text_mode=mode``."""
    over = {"train_shards": "x", "text_mode": mode, "both_loss": loss_kind, "batch_size": images.shape[0]}
    cfg = load_config("embedded", over)
    torch.manual_seed(0)
    model, *_ = create_model(cfg.model)
    texts = alt if mode == "mixed" else torch.cat([alt, syn])
    loss_fn = make_loss(cfg, DistEnv())
    forward_backward(model, [(images, texts)], loss_fn, "fp32", "cpu")
    t0 = time.thread_time()
    forward_backward(model, [(images, texts)], loss_fn, "fp32", "cpu")
    return time.thread_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 64, 64, generator=g)
    alt, syn = (torch.randint(1, 5000, (args.batch_size, 64), generator=g) for _ in range(2))
    runs = {"mixed": [], "both_mean": [], "multi_positive": []}
    for _ in range(args.repeats):
        runs["mixed"].append(step_seconds("mixed", "both_mean", images, alt, syn))
        runs["both_mean"].append(step_seconds("both", "both_mean", images, alt, syn))
        runs["multi_positive"].append(step_seconds("both", "multi_positive", images, alt, syn))
    for name, values in runs.items():
        print(f"{name:15} {statistics.median(values):.3f} s CPU per step (median of {args.repeats})")
    ratio = statistics.median(b / a for a, b in zip(runs["mixed"], runs["both_mean"], strict=True))
    print(f"both_step_cost_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
