"""WebDataset input pipeline with caption mixing, shared by CLIP and text-to-image training.

Stages: shard list (brace expansion) -> per-epoch deterministic shard shuffle -> split by node
-> split by worker -> tar samples -> attach synthetic captions from the shard's sidecars ->
choose the caption (``mixing.choose_caption``) -> sample shuffle buffer -> decode image ->
transform + tokenize -> batch.

Captions are chosen before the shuffle buffer, while samples still arrive shard by shard, so
only the current shard's sidecars are in memory. The choice depends on (seed, epoch, key)
only, so it does not change with the number of ranks or workers.

Bad data never stops training: a corrupt image, an unreadable or truncated tar, undecodable
caption bytes are logged with shard and key, counted per worker process, and the counts ride
along with the next batch as ``batch["data_errors"]`` so the trainer can total them.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from caption_mixing.long_captions import fit_caption, token_counter
from caption_mixing.mixing import ALT, Mixture, choose_caption
from caption_mixing.schedules import PSchedule
from caption_mixing.shards import expand_shards
from caption_mixing.sidecar import SidecarError, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDECAR_CHECK_SAMPLES = 32  # samples of a shard looked at before a sidecar that matches none of them is refused

# Per-process counts of skipped or repaired data since the last batch (each DataLoader worker has its own).
DATA_ERRORS: Counter = Counter()


def take_data_errors() -> dict[str, int]:
    """Counts since the last call, then reset (called when a batch is collated, in the same process)."""
    out = dict(DATA_ERRORS)
    DATA_ERRORS.clear()
    return out


class SharedEpoch:
    """Epoch counter shared with DataLoader workers (set by the trainer before each epoch)."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


def _worker_info() -> tuple[int, int]:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return rank, worker


def shuffle_shards(urls: list[str], seed: int, epoch: SharedEpoch) -> Callable[[Iterable], Iterator]:
    """Shuffle the shard list the same way on every rank (seeded by seed and epoch)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        items = list(src)
        random.Random(f"shards/{seed}/{epoch.get()}").shuffle(items)
        yield from items

    return stage


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler: a broken or truncated tar is logged and counted, and training goes on."""
    log.warning("skipping unreadable shard data: %r", exn)
    DATA_ERRORS["unreadable_tar"] += 1
    return True


def decode_text(raw: bytes | None, url: str, key: str) -> str:
    """UTF-8 caption bytes; undecodable bytes are replaced and counted."""
    if not raw:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        DATA_ERRORS["undecodable_text"] += 1
        log.warning("undecodable bytes in caption of %s in %s replaced", key, url)
        return raw.decode("utf-8", errors="replace")


def attach_captions(sources: tuple[str, ...], sidecar_dir: str | None = None) -> Callable[[Iterable], Iterator]:
    """Add ``sample["captions"] = {"alt": alt_text, source: caption or None, ...}``.

    Sidecars are read when a new shard starts, so memory is bounded by one shard.
    """

    def load_tables(url: str) -> dict[str, dict[str, str]]:
        tables = {}
        for source in sources:
            path = sidecar_path(url, source, sidecar_dir)
            if path.exists():
                tables[source] = read_sidecar(path, shard=url)
            else:
                log.warning("no %s sidecar for shard %s (looked for %s): its samples use alt-text", source, url, path)
                tables[source] = {}
        return tables

    def check_keys(url: str, tables: dict[str, dict[str, str]], seen: int, hits: Counter) -> None:
        """A sidecar that matches none of the shard's first samples belongs to another shard."""
        if seen != SIDECAR_CHECK_SAMPLES:
            return
        for source, table in tables.items():
            if table and hits[source] == 0:
                raise SidecarError(
                    f"{sidecar_path(url, source, sidecar_dir)}: none of the first {seen} sample keys of shard "
                    f"{url} is in this {source} sidecar; it belongs to a different shard"
                )

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        current_url, tables, seen, hits = None, {}, 0, Counter()
        for sample in src:
            url = sample["__url__"]
            if url != current_url:
                current_url, tables, seen, hits = url, load_tables(url), 0, Counter()
            key = sample["__key__"]
            captions: dict[str, str | None] = {ALT: decode_text(sample.get("txt"), url, key)}
            for source, table in tables.items():
                captions[source] = caption = table.get(key)
                hits[source] += caption is not None
            seen += 1
            check_keys(url, tables, seen, hits)
            sample["captions"] = captions
            yield sample

    return stage


def mix_captions(
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    schedule: PSchedule | None = None,
    num_epochs: int = 1,
) -> Callable[[Iterable], Iterator]:
    """Set ``caption``, ``caption_source`` (used) and ``caption_wanted`` (drawn) on each sample.

    With a schedule, the synthetic share for the epoch is ``schedule.at_epoch(epoch, num_epochs)``.
    """

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        ep = epoch.get()
        mix = mixture if schedule is None else mixture.with_synthetic_share(schedule.at_epoch(ep, num_epochs))
        for sample in src:
            choice = choose_caption(sample["captions"], mix, seed, ep, sample["__key__"])
            sample["caption"] = choice.caption
            sample["caption_source"] = choice.source
            sample["caption_wanted"] = choice.wanted
            yield sample

    return stage


def shuffle_samples(bufsize: int, seed: int, epoch: SharedEpoch) -> Callable[[Iterable], Iterator]:
    """Shuffle buffer seeded per (seed, epoch, rank, worker): reproducible for a given layout."""

    def stage(src: Iterable[Any]) -> Iterator[Any]:
        if bufsize <= 1:
            yield from src
            return
        rank, worker = _worker_info()
        rng = random.Random(f"samples/{seed}/{epoch.get()}/{rank}/{worker}")
        buf: list[Any] = []
        for item in src:
            if len(buf) < bufsize:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    return stage


def decode_image(src: Iterable[dict]) -> Iterator[dict]:
    """Decode the image member to RGB PIL; a corrupt image is skipped and logged with shard and key."""
    for sample in src:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            DATA_ERRORS["no_image"] += 1
            log.warning("sample %s in %s has no image member; skipped", sample.get("__key__"), sample.get("__url__"))
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                sample["image"] = img.convert("RGB")
        except Exception as exn:  # PIL raises many types for broken files
            DATA_ERRORS["corrupt_image"] += 1
            log.warning("corrupt image %s in shard %s skipped: %s", sample.get("__key__"), sample.get("__url__"), exn)
            continue
        yield sample


def to_training_tuple(
    image_transform: Callable,
    tokenizer: Callable,
    long_captions: str = "head",
    seed: int = 0,
    epoch: SharedEpoch | None = None,
) -> Callable[[dict], tuple]:
    """Transform the image and tokenize the caption, fitting long captions by the chosen policy."""
    context = getattr(tokenizer, "context_length", None)
    count = token_counter(tokenizer) if long_captions != "head" else None

    def fn(sample: dict) -> tuple:
        caption = sample["caption"]
        if count is not None and context:
            ep = epoch.get() if epoch is not None else 0
            caption = fit_caption(caption, long_captions, count, context, seed, ep, sample["__key__"])
        tokens = tokenizer([caption])[0]
        return (
            image_transform(sample["image"]),
            tokens,
            sample["__key__"],
            sample["caption_source"],
            sample["caption_wanted"],
        )

    return fn


def collate(samples: list[tuple]) -> dict[str, Any]:
    images, tokens, keys, sources, wanted = zip(*samples, strict=True)
    return {
        "images": torch.stack(images),
        "texts": torch.stack(tokens),
        "keys": list(keys),
        "sources": list(sources),
        "wanted": list(wanted),
        "data_errors": take_data_errors(),
    }


def caption_sample_stages(
    shards: str | list[str],
    *,
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    sidecar_dir: str | None = None,
    shuffle: bool = True,
    schedule: PSchedule | None = None,
    num_epochs: int = 1,
    resampled: bool = False,
) -> list:
    """Stages up to the mixed caption (no shuffle buffer, no decode): the part every task shares.

    ``resampled=True`` draws shards with replacement per worker (for corpora with fewer shards
    than ranks x workers, or fixed-length epochs); the caption choice stays a function of
    (seed, epoch, key). Without it, every sample appears exactly once per epoch across ranks x workers.
    """
    urls = expand_shards(shards)
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(shuffle_shards(urls, seed, epoch))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [
        wds.tarfile_to_samples(handler=log_and_continue),
        attach_captions(mixture.synthetic_sources, sidecar_dir),
        mix_captions(mixture, seed, epoch, schedule, num_epochs),
    ]
    return stages


def build_caption_pipeline(
    shards: str | list[str],
    *,
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    image_transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    shuffle_buffer: int = 1000,
    sidecar_dir: str | Path | None = None,
    drop_last: bool = True,
    long_captions: str = "head",
    schedule: PSchedule | None = None,
    num_epochs: int = 1,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
) -> wds.DataPipeline:
    """The training input pipeline; iterate it (or wrap it in a DataLoader with batch_size=None).

    ``batches_per_epoch`` fixes the epoch length per worker (required with ``resampled``).
    """
    if resampled and not batches_per_epoch:
        raise ValueError("resampled shards need batches_per_epoch (an epoch would never end)")
    stages = caption_sample_stages(
        shards,
        mixture=mixture,
        seed=seed,
        epoch=epoch,
        sidecar_dir=None if sidecar_dir is None else str(sidecar_dir),
        shuffle=shuffle_buffer > 0,
        schedule=schedule,
        num_epochs=num_epochs,
        resampled=resampled,
    )
    stages += [
        shuffle_samples(shuffle_buffer, seed, epoch),
        decode_image,
        wds.map(to_training_tuple(image_transform, tokenizer, long_captions, seed, epoch)),
        wds.batched(batch_size, collation_fn=collate, partial=not drop_last),
    ]
    pipeline = wds.DataPipeline(*stages)
    if batches_per_epoch:
        pipeline = pipeline.with_epoch(nbatches=batches_per_epoch)
    return pipeline


def make_loader(pipeline: wds.DataPipeline, num_workers: int) -> torch.utils.data.DataLoader:
    """DataLoader over an already-batched pipeline."""
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
