"""WebDataset input pipeline with caption mixing, shared by CLIP and text-to-image training.

Stages: shard list (brace expansion) -> per-epoch deterministic shard shuffle -> split by node
-> split by worker -> tar samples -> attach synthetic captions from the shard's sidecars ->
choose the caption (``mixing.choose_caption``) -> sample shuffle buffer -> decode image ->
transform + tokenize -> batch.

Captions are chosen before the shuffle buffer, while samples still arrive shard by shard, so
only the current shard's sidecars are in memory. The choice depends on (seed, epoch, key)
only, so it does not change with the number of ranks or workers.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from caption_mixing.mixing import ALT, Mixture, choose_caption
from caption_mixing.shards import expand_shards
from caption_mixing.sidecar import read_sidecar, sidecar_path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
    """webdataset handler: a broken tar or member is logged and skipped, training goes on."""
    log.warning("skipping unreadable data: %r", exn)
    return True


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

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        current_url, tables = None, {}
        for sample in src:
            url = sample["__url__"]
            if url != current_url:
                current_url, tables = url, load_tables(url)
            key = sample["__key__"]
            alt = sample.get("txt", b"")
            captions: dict[str, str | None] = {ALT: alt.decode("utf-8", errors="replace") if alt else ""}
            for source, table in tables.items():
                captions[source] = table.get(key)
            sample["captions"] = captions
            yield sample

    return stage


def mix_captions(mixture: Mixture, seed: int, epoch: SharedEpoch) -> Callable[[Iterable], Iterator]:
    """Set ``caption``, ``caption_source`` (used) and ``caption_wanted`` (drawn) on each sample."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        ep = epoch.get()
        for sample in src:
            choice = choose_caption(sample["captions"], mixture, seed, ep, sample["__key__"])
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
            log.warning("sample %s in %s has no image member; skipped", sample.get("__key__"), sample.get("__url__"))
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                sample["image"] = img.convert("RGB")
        except Exception as exn:  # PIL raises many types for broken files
            log.warning("corrupt image %s in shard %s skipped: %s", sample.get("__key__"), sample.get("__url__"), exn)
            continue
        yield sample


def to_training_tuple(image_transform: Callable, tokenizer: Callable) -> Callable[[dict], tuple]:
    def fn(sample: dict) -> tuple:
        tokens = tokenizer([sample["caption"]])[0]
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
    }


def caption_sample_stages(
    shards: str | list[str],
    *,
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    sidecar_dir: str | None = None,
    shuffle: bool = True,
) -> list:
    """Stages up to the mixed caption (no shuffle buffer, no decode): the part every task shares."""
    urls = expand_shards(shards)
    stages: list = [wds.SimpleShardList(urls)]
    if shuffle:
        stages.append(shuffle_shards(urls, seed, epoch))
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        attach_captions(mixture.synthetic_sources, sidecar_dir),
        mix_captions(mixture, seed, epoch),
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
) -> wds.DataPipeline:
    """The training input pipeline; iterate it (or wrap it in a DataLoader with batch_size=None)."""
    stages = caption_sample_stages(
        shards,
        mixture=mixture,
        seed=seed,
        epoch=epoch,
        sidecar_dir=None if sidecar_dir is None else str(sidecar_dir),
        shuffle=shuffle_buffer > 0,
    )
    stages += [
        shuffle_samples(shuffle_buffer, seed, epoch),
        decode_image,
        wds.map(to_training_tuple(image_transform, tokenizer)),
        wds.batched(batch_size, collation_fn=collate, partial=not drop_last),
    ]
    return wds.DataPipeline(*stages)


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
