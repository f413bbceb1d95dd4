"""Input-pipeline cost of caption mixing: the mixing stage's own cost beside the whole pipeline's, in the same run.

End-to-end pairs (plain WebDataset vs the same pipeline with mixing) cannot resolve 2% on a shared
VM: four runs of the older version of this script gave 1.53, 3.82, -3.48 and 0.73 %. So the headline
is measured inside one run instead: every mixing stage (sidecar lookup ``attach_captions``, the score
gate's lookup ``ScoreGate.stage``, the draw ``mix_captions``) is wrapped by a timer that counts the
time spent in the stage itself, not upstream of it; an identical wrapper around a pass-through stage
measures the timer's own cost, which is subtracted. The ratio

    mixing_share = (mixing stages' own time per sample) / (whole pipeline's time per sample)

is taken from the same samples and in this thread's CPU time (``time.thread_time``), so load from
other processes (preemption) counts in neither. The end-to-end
paired overhead (median over interleaved pairs, CPU time) is printed beside it as before.

Configs: ``random`` (the paper's rule at p), ``gate`` (``mix_mode: gate`` at p), ``nway``
(alt/altogether/scratch) and ``nway-gate``. Both read the same shards in one process on one thread,
decode the JPEG, resize to 224 px with open_clip's eval transform, tokenize and batch.

    python benchmarks/loader_throughput.py                 # embedded testbed, p=0.15
    python benchmarks/loader_throughput.py --shards '/data/cc12m/{00000..00003}.tar' --sidecar-dir DIR

Last line: ``mixing_share_pct_max=X`` (the largest share over the configs; target X <= 2).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from caption_mixing import Mixture, SharedEpoch  # noqa: E402
from caption_mixing.gate import GateSpec  # noqa: E402
from caption_mixing.mixing import unit_hash  # noqa: E402
from caption_mixing.pipeline import (  # noqa: E402
    DataErrors,
    batch_samples,
    caption_sample_stages,
    collate,
    decode_images,
    to_training_tuple,
)
from caption_mixing.shards import expand_shards, read_tar_samples  # noqa: E402
from caption_mixing.sidecar import sidecar_path, write_sidecar  # noqa: E402

MIXING_STAGES = ("attach_captions", "ScoreGate.stage", "mix_captions")


class _Timed:
    """An iterator that adds the time spent pulling from ``src`` to ``self.t``."""

    def __init__(self, src: Iterable) -> None:
        self.src, self.t = iter(src), 0.0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        t0 = time.thread_time()
        try:
            return next(self.src)
        finally:
            self.t += time.thread_time() - t0


def own_time(stage: Callable, totals: dict, name: str) -> Callable:
    """``stage`` wrapped so ``totals[name]`` accumulates the time spent in it, excluding its upstream."""

    def wrapped(src: Iterable) -> Iterator:
        up = _Timed(src)
        it = iter(stage(up))
        spent = 0.0
        try:
            while True:
                t0 = time.thread_time()
                try:
                    item = next(it)
                except StopIteration:
                    spent += time.thread_time() - t0
                    return
                spent += time.thread_time() - t0
                yield item
        finally:
            totals[name] = totals.get(name, 0.0) + spent - up.t

    return wrapped


def _pass_through(src: Iterable) -> Iterator:
    yield from src


def _stage_name(stage: Callable) -> str:
    qual = getattr(stage, "__qualname__", "")
    if qual.startswith("ScoreGate.stage"):
        return "ScoreGate.stage"
    return qual.split(".")[0]


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


def mixing_pipeline(urls, transform, tokenizer, batch_size: int, mode: dict, sidecar_dir: str, totals=None):
    """The training pipeline (``build_caption_pipeline``'s stages, no shuffle buffer); with ``totals``, each
    mixing stage and a pass-through reference stage are timed (``own_time``)."""
    errors = DataErrors()
    stages = caption_sample_stages(
        urls, seed=0, epoch=SharedEpoch(0), sidecar_dir=sidecar_dir, shuffle=False, errors=errors, **mode
    )
    if totals is not None:
        stages = [own_time(s, totals, _stage_name(s)) if _stage_name(s) in MIXING_STAGES else s for s in stages]
        stages.insert(len(stages) - 1, own_time(_pass_through, totals, "timer_reference"))
    stages += [
        decode_images(errors),
        wds.map(to_training_tuple(transform, tokenizer)),
        batch_samples(batch_size, collate, partial=False, errors=errors),
    ]
    return wds.DataPipeline(*stages)


def _count(pipeline: Iterable, max_samples: int) -> int:
    n = 0
    for batch in pipeline:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch.get("images")
        if images is None:
            continue
        n += images.shape[0]
        if n >= max_samples:
            break
    return n


def samples_per_s(make: Callable, max_samples: int) -> float:
    """Samples per CPU-second of this (single-threaded) process: per-core throughput, robust to other load."""
    t0 = time.process_time()
    n = _count(make(), max_samples)
    return n / (time.process_time() - t0)


def stage_shares(make_timed: Callable, max_samples: int) -> dict[str, float]:
    """Per-sample µs of each mixing stage (timer cost subtracted) and of the whole pipeline, one run."""
    totals: dict[str, float] = {}
    t0 = time.thread_time()
    n = _count(make_timed(totals), max_samples)
    whole = time.thread_time() - t0
    ref = totals.pop("timer_reference", 0.0)
    mixing = sum(max(0.0, v - ref) for v in totals.values())
    out = {f"{k}_us": 1e6 * max(0.0, v - ref) / n for k, v in totals.items()}
    out.update(timer_us=1e6 * ref / n, mixing_us=1e6 * mixing / n, pipeline_us=1e6 * whole / n)
    out["share_pct"] = 100.0 * mixing / whole
    return out


def prepare_sidecars(urls: list[str], src_dir: str | None, sources: tuple[str, ...]) -> str:
    """A temporary sidecar folder: the caption sidecars copied, plus a ``clip_score_alt`` score sidecar per
    shard (a hash stands in for the score: the gate's cost does not depend on the values)."""
    tmp = tempfile.mkdtemp(prefix="loader_bench_")
    for url in urls:
        for source in sources:
            src = Path(sidecar_path(url, source, src_dir))
            if src.exists():
                shutil.copy(src, sidecar_path(url, source, tmp))
        keys = [s["__key__"] for s in read_tar_samples(url, want=())]
        scores = {k: unit_hash(7, 0, k) for k in keys}
        write_sidecar(sidecar_path(url, "clip_score_alt", tmp), url, "clip_score_alt", {}, {"clip_score": scores})
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="brace pattern (default: 4 shards of the embedded testbed)")
    ap.add_argument("--sidecar-dir", default=None, help="where the caption sidecars are (default: beside the shards)")
    ap.add_argument("--p", type=float, default=0.15)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model whose 224 px transform and tokenizer are used")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1536, help="samples per timed run")
    ap.add_argument("--repeats", type=int, default=6, help="interleaved end-to-end pairs per config")
    ap.add_argument("--configs", default="random,gate,nway,nway-gate")
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
    sidecars = prepare_sidecars(urls, args.sidecar_dir, ("altogether", "scratch"))
    nway = Mixture.parse("alt=0.85,altogether=0.1,scratch=0.05", fallback="altogether,alt").with_synthetic_share(args.p)
    modes = {
        "random": dict(mixture=Mixture.from_p(args.p)),
        "gate": dict(mixture=Mixture.from_p(args.p), gate=GateSpec()),
        "nway": dict(mixture=nway),
        "nway-gate": dict(mixture=nway, gate=GateSpec()),
    }
    chosen = [c.strip() for c in args.configs.split(",")]
    print(
        f"shards: {len(urls)} ({urls[0]} ...), {args.samples} samples per run, {args.repeats} interleaved pairs "
        f"per config, 1 thread; p={args.p:g}"
    )
    print(f"{'config':10} {'mixing µs/sample':>17} {'pipeline µs/sample':>19} {'share %':>8} {'e2e paired %':>13}")
    shares = {}
    try:
        for name in chosen:
            mode = modes[name]

            def make_mixed(mode=mode):
                return mixing_pipeline(urls, transform, tokenizer, args.batch_size, mode, sidecars)

            def make_timed(totals, mode=mode):
                return mixing_pipeline(urls, transform, tokenizer, args.batch_size, mode, sidecars, totals)

            plain, mixed, timed = [], [], []
            for i in range(args.repeats):  # interleaved, alternating which goes first
                runs = [
                    (plain, lambda: plain_pipeline(urls, transform, tokenizer, args.batch_size)),
                    (mixed, make_mixed),
                ]
                for results, make in runs if i % 2 == 0 else runs[::-1]:
                    results.append(samples_per_s(make, args.samples))
                timed.append(stage_shares(make_timed, args.samples))
            paired = statistics.median(100.0 * (a / b - 1.0) for a, b in zip(plain, mixed, strict=True))
            med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
            shares[name] = med["share_pct"]
            print(
                f"{name:10} {med['mixing_us']:17.1f} {med['pipeline_us']:19.1f} {med['share_pct']:8.2f} {paired:13.2f}"
            )
            detail = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in med.items() if k.endswith("_us") and k != "pipeline_us")
            print(f"           per-stage µs/sample (median of {len(timed)}): {detail}")
    finally:
        shutil.rmtree(sidecars, ignore_errors=True)
    worst = max(shares.values())
    print(f"mixing_share_pct_max={worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
