"""Input-pipeline cost of caption mixing: plain WebDataset vs the same pipeline with mixing.

Both read the same shards in one process on one core (per-core throughput), decode the JPEG,
resize to 224 px with open_clip's eval transform, tokenize with open_clip's tokenizer and batch.
The plain pipeline uses alt-text only; the mixing pipeline reads the shard's sidecar, draws the
caption from (seed, epoch, key) at ratio p and tokenizes it. Runs alternate in pairs;
time is this process's CPU time (samples per CPU-second = per-core throughput) and the headline is
the median over pairs of the overhead, so that load from other processes favours neither side.

    python benchmarks/loader_throughput.py                 # embedded testbed, p=0.15
    python benchmarks/loader_throughput.py --shards '/data/cc12m/{00000..00003}.tar' --p 0.15

Prints samples/s per core for both and, last, ``mixing_overhead_pct=X`` (target X <= 2).
``--p 0`` isolates the mixing machinery (sidecar read, hash, choice) from the cost of
tokenizing longer synthetic captions, which is part of the p=0.15 figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from caption_mixing import Mixture, SharedEpoch, build_caption_pipeline  # noqa: E402
from caption_mixing.shards import expand_shards  # noqa: E402


def plain_pipeline(urls: list[str], transform, tokenizer, batch_size: int) -> wds.DataPipeline:
    def tokenize(text: str) -> torch.Tensor:
        return tokenizer([text])[0]

    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.to_tuple("jpg", "txt"),
        wds.map_tuple(transform, tokenize),
        wds.batched(batch_size, partial=False),
    )


def mixing_pipeline(urls: list[str], transform, tokenizer, batch_size: int, p: float, source: str) -> wds.DataPipeline:
    return build_caption_pipeline(
        urls,
        mixture=Mixture.from_p(p, source),
        seed=0,
        epoch=SharedEpoch(0),
        image_transform=transform,
        tokenizer=tokenizer,
        batch_size=batch_size,
        shuffle_buffer=0,  # the plain pipeline has no shuffle buffer either
    )


def samples_per_s(make, max_samples: int) -> float:
    """Samples per CPU-second of this (single-threaded) process: per-core throughput, robust to other load."""
    n = 0
    t0 = time.process_time()
    for batch in make():
        images = batch[0] if isinstance(batch, (list, tuple)) else batch["images"]
        n += images.shape[0]
        if n >= max_samples:
            break
    return n / (time.process_time() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="brace pattern (default: 4 shards of the embedded testbed)")
    ap.add_argument("--source", default="altogether", help="synthetic caption source (sidecar name)")
    ap.add_argument("--p", type=float, default=0.15)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model whose 224 px transform and tokenizer are used")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1536, help="samples per timed run")
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()

    torch.set_num_threads(1)
    if args.shards is None:
        from testbed import ensure_testbed

        urls = expand_shards(ensure_testbed(progress=False).train_shards)[:4]
    else:
        urls = expand_shards(args.shards)
    cfg = open_clip.get_model_config(args.model)
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer(args.model)

    plain, mixed = [], []
    for i in range(args.repeats):  # interleaved pairs, alternating which goes first, so drift hits both alike
        runs = [
            (plain, lambda: plain_pipeline(urls, transform, tokenizer, args.batch_size)),
            (mixed, lambda: mixing_pipeline(urls, transform, tokenizer, args.batch_size, args.p, args.source)),
        ]
        for results, make in runs if i % 2 == 0 else runs[::-1]:
            results.append(samples_per_s(make, args.samples))
    # Headline: the median over pairs of (plain / mixed - 1); one pair runs back to back, so slow
    # phases of a shared VM cancel within it. Best-of is printed beside it as a cross-check.
    paired = statistics.median(100.0 * (a / b - 1.0) for a, b in zip(plain, mixed, strict=True))
    best = 100.0 * (max(plain) / max(mixed) - 1.0)
    print(
        f"shards: {len(urls)} ({urls[0]} ...), {args.samples} samples per run, "
        f"{args.repeats} interleaved pairs, 1 thread, CPU time"
    )
    print(f"plain webdataset:   median {statistics.median(plain):7.1f} samples/s per core   best {max(plain):7.1f}")
    print(f"with mixing p={args.p:g}: median {statistics.median(mixed):7.1f} samples/s per core  best {max(mixed):.1f}")
    print(f"overhead: median of paired runs {paired:.2f}%, best vs best {best:.2f}%")
    print(f"mixing_overhead_pct={paired:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
