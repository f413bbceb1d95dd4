"""WebDataset input pipeline with caption mixing, shared by CLIP and text-to-image training.

Stages: shard list (brace expansion) -> per-epoch deterministic shard shuffle -> split by node
-> split by worker -> tar samples -> attach synthetic captions from the shard's sidecars ->
choose the caption (``mixing.choose_caption``, then the blank alt-text rule) -> sample shuffle
buffer -> decode image -> transform + tokenize -> batch.

Captions are chosen before the shuffle buffer, while samples still arrive shard by shard, so
only the current shard's sidecars are in memory. The choice depends on (seed, epoch, key)
only, so it does not change with the number of ranks or workers.

Blank alt-text (``blank_alt``): a sample whose ``.txt`` is missing, empty or whitespace never
trains on that blank text.

- ``"fallback"`` (default): when the mixing rule would use the alt-text (drawn, or reached by
  fallback), the sample uses a synthetic caption instead, trying the mixture's synthetic sources
  in fallback order (those named in ``Mixture.fallback`` first, then the others as declared);
  counted as ``blank_alt/fallback/<source>``. A sample with no usable synthetic caption either is
  skipped (``blank_alt/skipped``). Samples whose draw picks a usable synthetic caption are not
  affected, so the set of samples trained on does not depend on p.
- ``"skip"``: every sample with blank alt-text is skipped (``blank_alt/skipped``).

Bad data never stops training, and every case is counted exactly once (``data_errors``):

============================  ==============================================  =======================
kind                          what happens                                    logged
============================  ==============================================  =======================
``corrupt_image``             image bytes PIL cannot decode: sample skipped   warning: shard, key
``no_image``                  sample without an image member: skipped         warning: shard, key
``truncated_tar``             shard ends early: its complete samples train,   warning: shard, byte
                              the sample being read is dropped                offset, the key cut
``unreadable_tar``            shard not a tar (or garbage inside): the        warning: shard, byte
                              samples before the damage train                 offset
``bad_bytes``                 ``.txt`` not UTF-8: bytes replaced by U+FFFD,   warning: shard, key
                              the sample trains
``blank_alt/skipped``         see above                                       not logged (counted)
``blank_alt/fallback/<src>``  see above                                       not logged (counted)
============================  ==============================================  =======================

Contract for trainers: every item of the pipeline is a dict with ``data_errors`` (kind -> count
in that worker since its previous item). Counts that arise after a worker's last batch (samples
dropped with the last partial batch, a shard damaged at the end) come in one extra *errors-only*
item at the end of the worker's pass (``is_errors_only(item)``: no samples, do not train on
it). ``iter_batches`` hides those items, adds every count to a Counter and skips batches when
resuming, so the totals are exact across workers, epochs and resumes.
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
from caption_mixing.mixing import ALT, Choice, Mixture, check_blank_alt, choose_caption
from caption_mixing.paths import validate_name
from caption_mixing.schedules import PSchedule
from caption_mixing.shards import ShardReadError, expand_shards, read_tar_samples
from caption_mixing.sidecar import SidecarError, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDECAR_CHECK_SAMPLES = 32  # samples of a shard looked at before a sidecar that matches none of them is refused
ERRORS_ONLY = "errors_only"


class DataErrors(Counter):
    """Counts of skipped or repaired data in one process since the last batch.

    ``build_caption_pipeline`` makes one per pipeline (each DataLoader worker works on its own
    copy); stages called without one share the process-wide ``DATA_ERRORS``.
    """

    def record(self, kind: str, message: str | None = None, *args: object) -> None:
        """Count one case of ``kind`` and log ``message`` (if any) as a warning."""
        if message is not None:
            log.warning(message, *args)
        self[kind] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last call, then reset."""
        out = {k: v for k, v in self.items() if v}
        self.clear()
        return out


DATA_ERRORS = DataErrors()


def take_data_errors() -> dict[str, int]:
    """Counts of the process-wide ``DATA_ERRORS`` since the last call, then reset."""
    return DATA_ERRORS.take()


def is_errors_only(item: dict) -> bool:
    """True for the item that carries a worker's last counts without samples (never train on it)."""
    return bool(item.get(ERRORS_ONLY))


def iter_batches(loader: Iterable[dict], skip: int = 0, errors: Counter | None = None) -> Iterator[tuple[int, dict]]:
    """``(i, batch)`` with i = 1, 2, ... counting real batches only, after the first ``skip`` of them.

    Every item's ``data_errors`` after that point (errors-only items included) is added to
    ``errors``: on resume, the counts of the skipped batches are already in the checkpoint.
    """
    i = 0
    for item in loader:
        if is_errors_only(item):
            if i >= skip and errors is not None:
                errors.update(item["data_errors"])
            continue
        i += 1
        if i > skip:
            if errors is not None:
                errors.update(item.get("data_errors", {}))
            yield i, item


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


def read_shards(errors: DataErrors | None = None) -> Callable[[Iterable], Iterator]:
    """Stage: ``{"url": shard}`` items -> samples. A damaged shard is logged (shard, byte offset,
    the sample cut) and counted as ``truncated_tar`` or ``unreadable_tar``; the rest goes on."""
    errs = DATA_ERRORS if errors is None else errors

    def stage(src: Iterable[Any]) -> Iterator[dict]:
        for item in src:
            url = item["url"] if isinstance(item, dict) else str(item)
            try:
                yield from read_tar_samples(url)
            except ShardReadError as e:
                errs.record(e.kind, "%s", e)

    return stage


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler for pipelines built on ``wds.tarfile_to_samples`` (prefer ``read_shards``,
    which names the offset and the sample cut and counts a damaged shard once)."""
    DATA_ERRORS.record("unreadable_tar", "skipping unreadable shard data: %r", exn)
    return True


def decode_text(raw: bytes | None, url: str, key: str, errors: DataErrors | None = None) -> str:
    """UTF-8 caption bytes; bytes that are not UTF-8 are replaced with U+FFFD, logged and counted."""
    if not raw:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        (DATA_ERRORS if errors is None else errors).record(
            "bad_bytes", "alt-text of sample %s in shard %s is not UTF-8 (%s); bytes replaced", key, url, e.reason
        )
        return raw.decode("utf-8", errors="replace")


def attach_captions(
    sources: tuple[str, ...], sidecar_dir: str | None = None, errors: DataErrors | None = None
) -> Callable[[Iterable], Iterator]:
    """Add ``sample["captions"] = {"alt": alt_text, source: caption or None, ...}``.

    Sidecars are read when a new shard starts, so memory is bounded by one shard.
    """
    for source in sources:
        validate_name(source, "caption source")

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
            captions: dict[str, str | None] = {ALT: decode_text(sample.get("txt"), url, key, errors)}
            for source, table in tables.items():
                captions[source] = caption = table.get(key)
                hits[source] += caption is not None
            seen += 1
            check_keys(url, tables, seen, hits)
            sample["captions"] = captions
            yield sample

    return stage


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def blank_alt_order(mixture: Mixture) -> tuple[str, ...]:
    """Synthetic sources tried for a blank alt-text: those in the fallback order, then the rest as declared."""
    named = [s for s in mixture.fallback if s != ALT]
    return tuple(dict.fromkeys([*named, *mixture.synthetic_sources]))


def _choose(
    captions: dict[str, str | None], mix: Mixture, seed: int, epoch: int, key: str, policy: str, errs: DataErrors
) -> Choice | None:
    """The caption choice with the blank alt-text rule applied; None means skip the sample (counted)."""
    choice = choose_caption(captions, mix, seed, epoch, key)
    if not _blank(captions.get(ALT)):
        return choice
    if policy == "skip":
        errs.record("blank_alt/skipped")
        return None
    if choose_caption({**captions, ALT: "-"}, mix, seed, epoch, key).source != ALT:
        return choice  # the alt-text would not have been used anyway
    if choice.source == ALT:  # nothing usable along the mixture's fallback order: try every synthetic source
        source = next((s for s in blank_alt_order(mix) if not _blank(captions.get(s))), None)
        if source is None:
            errs.record("blank_alt/skipped")
            return None
        choice = Choice(captions[source], source, choice.wanted)
    errs.record(f"blank_alt/fallback/{choice.source}")
    return choice


def mix_captions(
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    schedule: PSchedule | None = None,
    num_epochs: int = 1,
    blank_alt: str = "fallback",
    errors: DataErrors | None = None,
) -> Callable[[Iterable], Iterator]:
    """Set ``caption``, ``caption_source`` (used) and ``caption_wanted`` (drawn) on each sample.

    With a schedule, the synthetic share for the epoch is ``schedule.at_epoch(epoch, num_epochs)``.
    Samples with blank alt-text follow ``blank_alt`` (module docstring).
    """
    policy = check_blank_alt(blank_alt)
    errs = DATA_ERRORS if errors is None else errors

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        ep = epoch.get()
        mix = mixture if schedule is None else mixture.with_synthetic_share(schedule.at_epoch(ep, num_epochs))
        for sample in src:
            choice = _choose(sample["captions"], mix, seed, ep, sample["__key__"], policy, errs)
            if choice is None:
                continue
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


def decode_images(errors: DataErrors | None = None) -> Callable[[Iterable], Iterator]:
    """Stage: decode the image member to RGB PIL; a corrupt or missing image is skipped, logged and counted."""
    errs = DATA_ERRORS if errors is None else errors

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            key, url = sample.get("__key__"), sample.get("__url__")
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                errs.record("no_image", "sample %s in shard %s has no image member; skipped", key, url)
                continue
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    sample["image"] = img.convert("RGB")
            except Exception as exn:  # PIL raises many types for broken files
                errs.record("corrupt_image", "corrupt image %s in shard %s skipped: %s", key, url, exn)
                continue
            yield sample

    return stage


decode_image = decode_images()  # the stage with the process-wide counts


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
    }


def batch_samples(
    batch_size: int, collate_fn: Callable[[list], dict], partial: bool, errors: DataErrors | None = None
) -> Callable[[Iterable], Iterator]:
    """Stage: batches with ``data_errors``; counts left after the last batch come as an errors-only item."""
    errs = DATA_ERRORS if errors is None else errors

    def deliver(batch: dict) -> dict:
        counts = Counter(batch.get("data_errors", {}))  # a collate_fn that took counts itself keeps them
        counts.update(errs.take())
        batch["data_errors"] = dict(counts)
        return batch

    def stage(src: Iterable[Any]) -> Iterator[dict]:
        buf: list[Any] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == batch_size:
                yield deliver(collate_fn(buf))
                buf = []
        if buf and partial:
            yield deliver(collate_fn(buf))
        elif any(errs.values()):
            yield {ERRORS_ONLY: True, "data_errors": errs.take()}

    return stage


class EpochBatches(torch.utils.data.IterableDataset):
    """``n`` real batches per iteration (per worker): passes over ``pipeline`` repeat while it runs
    short, as WebDataset's ``with_epoch`` does, but errors-only items are passed on without
    counting towards ``n``."""

    def __init__(self, pipeline: Iterable[dict], n: int) -> None:
        super().__init__()
        self.pipeline, self.n = pipeline, n

    def __iter__(self) -> Iterator[dict]:
        real = 0
        while True:
            got = 0
            for item in self.pipeline:
                yield item
                if not is_errors_only(item):
                    got, real = got + 1, real + 1
                    if real >= self.n:
                        return
            if got == 0:
                return


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
    blank_alt: str = "fallback",
    errors: DataErrors | None = None,
) -> list:
    """Stages up to the mixed caption (no shuffle buffer, no decode): the part every task shares.

    ``resampled=True`` draws shards with replacement per worker (for corpora with fewer shards
    than ranks x workers, or fixed-length epochs); the caption choice stays a function of
    (seed, epoch, key). Without it, every sample appears exactly once per epoch across ranks x workers.
    ``blank_alt`` is the rule for blank alt-text (module docstring); ``errors`` receives the counts
    (default: the process-wide ``DATA_ERRORS``).
    """
    check_blank_alt(blank_alt)
    for source in mixture.synthetic_sources:
        validate_name(source, "caption source")
    urls = expand_shards(shards)
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(shuffle_shards(urls, seed, epoch))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [
        read_shards(errors),
        attach_captions(mixture.synthetic_sources, sidecar_dir, errors),
        mix_captions(mixture, seed, epoch, schedule, num_epochs, blank_alt, errors),
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
    blank_alt: str = "fallback",
) -> torch.utils.data.IterableDataset:
    """The training input pipeline; iterate it (or wrap it in a DataLoader with batch_size=None).

    ``batches_per_epoch`` fixes the epoch length per worker in real batches (required with
    ``resampled``). Items follow the trainer contract in the module docstring (``iter_batches``).
    """
    if resampled and not batches_per_epoch:
        raise ValueError("resampled shards need batches_per_epoch (an epoch would never end)")
    errors = DataErrors()
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
        blank_alt=blank_alt,
        errors=errors,
    )
    stages += [
        shuffle_samples(shuffle_buffer, seed, epoch),
        decode_images(errors),
        wds.map(to_training_tuple(image_transform, tokenizer, long_captions, seed, epoch)),
        batch_samples(batch_size, collate, partial=not drop_last, errors=errors),
    ]
    pipeline = wds.DataPipeline(*stages)
    return EpochBatches(pipeline, batches_per_epoch) if batches_per_epoch else pipeline


def make_loader(pipeline: Iterable, num_workers: int) -> torch.utils.data.DataLoader:
    """DataLoader over an already-batched pipeline."""
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
