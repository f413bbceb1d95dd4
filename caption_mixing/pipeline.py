"""WebDataset input pipeline with caption mixing, shared by CLIP and text-to-image training.

Stages: shard list (brace expansion) -> per-epoch deterministic shard shuffle -> split by node
-> split by worker -> tar samples -> attach synthetic captions from the shard's sidecars ->
choose the caption (``mixing.choose_caption``, then the blank alt-text rule) -> sample shuffle
buffer -> decode image -> transform + tokenize -> batch.

Captions are chosen before the shuffle buffer, while samples still arrive shard by shard, so
only the current shard's sidecars are in memory. The choice depends on (seed, epoch, key)
only, so it does not change with the number of ranks or workers.

A key seen again in the same epoch draws again (``ShardVisits``): when a worker repeats its
shards to fill a fixed-length epoch (``EpochBatches``), its n-th pass is visit n of each sample;
with resampled shards the n-th opening of a shard in a stream (rank, worker) is visit n, and the
stream is part of the draw. A resume replays its epoch from the start, so the visit counts come
back with the data position (nothing more to save).

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from caption_mixing.gate import SCORE_KEY, GateSpec, ScoreGate
from caption_mixing.long_captions import fit_caption, token_counter
from caption_mixing.mixing import (
    ALT,
    PAPER,
    Choice,
    Mixture,
    check_blank_alt,
    check_p_mode,
    choose_caption,
    effective_mixture,
    resolve_variants,
    visit_key,
)
from caption_mixing.paths import validate_name
from caption_mixing.schedules import PSchedule
from caption_mixing.shards import ShardReadError, expand_shards, read_tar_samples
from caption_mixing.sidecar import SidecarError, load_sidecar, sidecar_path

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


VISIT = "__visit__"  # sample field: earlier visits of this sample in this stream and epoch
DRAW_KEY = "draw_key"  # sample field: what this visit's draws hash (``caption_mixing.mixing.visit_key``)


class ShardVisits:
    """How often this stream (one rank's worker) has opened each shard in the current epoch.

    The n-th opening of a shard is visit n of every sample in it (keys are unique within a shard),
    so repeated samples draw again without a table of keys. One object per pipeline; a DataLoader
    worker works on its own copy. A pass of a plain pipeline counts from zero; inside
    ``EpochBatches`` the passes of one epoch keep counting (``hold``).
    """

    def __init__(self) -> None:
        self.opens: Counter = Counter()
        self.held = False

    def hold(self) -> None:
        """Start an epoch whose passes all count (called by ``EpochBatches``)."""
        self.opens.clear()
        self.held = True

    def release(self) -> None:
        self.held = False

    def begin_pass(self) -> None:
        if not self.held:
            self.opens.clear()

    def open(self, url: str) -> int:
        """The visit index of the shard's samples for this opening."""
        n = self.opens[url]
        self.opens[url] += 1
        return n


class ResampledShardList(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, without end, seeded by (seed, epoch, rank, worker).

    Unlike webdataset's ``ResampledShards`` (seeded by a count of its own iterations, which restarts
    in every fresh process: each epoch's DataLoader workers and every resume), each epoch draws a
    new sequence and a resumed run draws the same one again.
    """

    def __init__(self, urls: list[str], seed: int, epoch: SharedEpoch) -> None:
        super().__init__()
        if not urls:
            raise ValueError("resampled shards: the shard list is empty")
        self.urls, self.seed, self.epoch = list(urls), seed, epoch

    def __iter__(self) -> Iterator[dict]:
        rank, worker = _worker_info()
        rng = random.Random(f"resample/{self.seed}/{self.epoch.get()}/{rank}/{worker}")
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


def shuffle_shards(urls: list[str], seed: int, epoch: SharedEpoch) -> Callable[[Iterable], Iterator]:
    """Shuffle the shard list the same way on every rank (seeded by seed and epoch)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        items = list(src)
        random.Random(f"shards/{seed}/{epoch.get()}").shuffle(items)
        yield from items

    return stage


def read_shards(errors: DataErrors | None = None, visits: ShardVisits | None = None) -> Callable[[Iterable], Iterator]:
    """Stage: ``{"url": shard}`` items -> samples. A damaged shard is logged (shard, byte offset,
    the sample cut) and counted as ``truncated_tar`` or ``unreadable_tar``; the rest goes on.
    With ``visits``, each sample carries its visit index (``VISIT``)."""
    errs = DATA_ERRORS if errors is None else errors

    def stage(src: Iterable[Any]) -> Iterator[dict]:
        if visits is not None:
            visits.begin_pass()
        for item in src:
            url = item["url"] if isinstance(item, dict) else str(item)
            visit = visits.open(url) if visits is not None else 0
            try:
                for sample in read_tar_samples(url):
                    sample[VISIT] = visit
                    yield sample
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
            table = load_sidecar(url, source, sidecar_dir)  # local or remote (caption_mixing.storage)
            if table is None:
                path = sidecar_path(url, source, sidecar_dir)
                log.warning("no %s sidecar for shard %s (looked for %s): its samples use alt-text", source, url, path)
            tables[source] = table or {}
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
    captions: dict[str, str | None],
    mix: Mixture,
    draw: tuple[int, int, str, int, str],
    policy: str,
    errs: DataErrors,
    choose: Callable[..., Choice] = choose_caption,
) -> Choice | None:
    """The caption choice with the blank alt-text rule applied; None means skip the sample (counted).

    ``draw`` is (seed, epoch, key, visit, stream), the arguments of ``choose_caption`` (or of the
    score gate's ``choose``, ``caption_mixing.gate``).
    """
    choice = choose(captions, mix, *draw)
    if not _blank(captions.get(ALT)):
        return choice
    if policy == "skip":
        errs.record("blank_alt/skipped")
        return None
    if choose({**captions, ALT: "-"}, mix, *draw).source != ALT:
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
    resampled: bool = False,
    coverage: dict[str, float] | None = None,
    gate: ScoreGate | None = None,
) -> Callable[[Iterable], Iterator]:
    """Set ``caption``, ``caption_source`` (used), ``caption_wanted`` (drawn) and ``DRAW_KEY`` on each sample.

    A source holding several variants per image gives one, drawn with the sample's other draws
    (``mixing.resolve_variants``). With ``coverage`` (``p_mode: effective``) each epoch's mixture is
    raised so the realized shares are its weights where coverage allows (``mixing.effective_mixture``).

    With a schedule, the synthetic share for the epoch is ``schedule.at_epoch(epoch, num_epochs)``.
    Samples with blank alt-text follow ``blank_alt`` (module docstring). A sample's visit index
    (``VISIT``, set by ``read_shards``) and, for ``resampled`` streams, the stream (rank/worker)
    enter the draw, so repeated visits draw again. With ``gate`` (``mix_mode: gate``) the epoch's
    mixture gives the gate's share p and the gate chooses (``caption_mixing.gate``).
    """
    policy = check_blank_alt(blank_alt)
    errs = DATA_ERRORS if errors is None else errors

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        ep = epoch.get()
        mix = mixture if schedule is None else mixture.with_synthetic_share(schedule.at_epoch(ep, num_epochs))
        if coverage is not None:
            mix = effective_mixture(mix, coverage)[0]
        stream = "{}/{}".format(*_worker_info()) if resampled else ""
        rule = None if gate is None else gate.rule(mix)
        for sample in src:
            key, visit = sample["__key__"], sample.get(VISIT, 0)
            draw = (seed, ep, key, visit, stream)
            choose = choose_caption if rule is None else partial(rule.choose, score=sample.get(SCORE_KEY))
            if rule is not None and sample.get(SCORE_KEY) is None:
                errs.record("gate/no_score")
            choice = _choose(resolve_variants(sample["captions"], mix, *draw), mix, draw, policy, errs, choose)
            if choice is None:
                continue
            sample[DRAW_KEY] = visit_key(key, visit, stream)
            sample["caption"] = choice.caption
            sample["caption_source"] = choice.source
            sample["caption_wanted"] = choice.wanted
            yield sample

    return stage


def pair_captions(
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    blank_alt: str = "fallback",
    errors: DataErrors | None = None,
    resampled: bool = False,
) -> Callable[[Iterable], Iterator]:
    """``text_mode: both``: every sample keeps its alt-text as ``caption`` and gets a synthetic one as
    ``caption_pair`` (drawn among the mixture's synthetic sources by their relative weights, falling
    back along the declared order: a sample without one pairs its alt-text with itself, counted as a
    fallback). ``caption_source``/``caption_wanted`` describe the synthetic side. Blank alt-text follows
    ``blank_alt``: ``fallback`` uses the synthetic caption on both sides (counted), ``skip`` skips."""
    policy = check_blank_alt(blank_alt)
    errs = DATA_ERRORS if errors is None else errors
    synthetic = mixture.with_synthetic_share(1.0)

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        ep = epoch.get()
        stream = "{}/{}".format(*_worker_info()) if resampled else ""
        for sample in src:
            key, visit = sample["__key__"], sample.get(VISIT, 0)
            draw = (seed, ep, key, visit, stream)
            captions = resolve_variants(sample["captions"], synthetic, *draw)
            choice = choose_caption(captions, synthetic, *draw)
            alt = captions.get(ALT)
            if _blank(alt):
                if policy == "skip" or _blank(choice.caption):
                    errs.record("blank_alt/skipped")
                    continue
                errs.record(f"blank_alt/fallback/{choice.source}")
                alt = choice.caption
            sample[DRAW_KEY] = visit_key(key, visit, stream)
            sample["caption"], sample["caption_pair"] = alt, choice.caption
            sample["caption_source"], sample["caption_wanted"] = choice.source, choice.wanted
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

    def tokens_of(caption: str, sample: dict) -> torch.Tensor:
        if count is not None and context:
            ep = epoch.get() if epoch is not None else 0
            draw = sample.get(DRAW_KEY, sample["__key__"])
            caption = fit_caption(caption, long_captions, count, context, seed, ep, draw)
        return tokenizer([caption])[0]

    def fn(sample: dict) -> tuple:
        out = (
            image_transform(sample["image"]),
            tokens_of(sample["caption"], sample),
            sample["__key__"],
            sample["caption_source"],
            sample["caption_wanted"],
        )
        if "caption_pair" in sample:  # text_mode both: the synthetic caption's tokens too
            return (*out, tokens_of(sample["caption_pair"], sample))
        return out

    return fn


def collate(samples: list[tuple]) -> dict[str, Any]:
    """Stack a batch; samples of ``text_mode: both`` add ``texts_pair`` (the synthetic captions' tokens)."""
    columns = list(zip(*samples, strict=True))
    images, tokens, keys, sources, wanted = columns[:5]
    batch = {
        "images": torch.stack(images),
        "texts": torch.stack(tokens),
        "keys": list(keys),
        "sources": list(sources),
        "wanted": list(wanted),
    }
    if len(columns) > 5:
        batch["texts_pair"] = torch.stack(columns[5])
    return batch


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
    counting towards ``n``. ``visits`` (the pipeline's ``ShardVisits``) keeps counting across the
    passes of one iteration, so a repeated sample draws its caption again."""

    def __init__(self, pipeline: Iterable[dict], n: int, visits: ShardVisits | None = None) -> None:
        super().__init__()
        self.pipeline, self.n, self.visits = pipeline, n, visits

    def __iter__(self) -> Iterator[dict]:
        if self.visits is not None:
            self.visits.hold()
        try:
            yield from self._passes()
        finally:
            if self.visits is not None:
                self.visits.release()

    def _passes(self) -> Iterator[dict]:
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
    visits: ShardVisits | None = None,
    p_mode: str = PAPER,
    gate: GateSpec | None = None,
    pair_texts: bool = False,
) -> list:
    """Stages up to the mixed caption (no shuffle buffer, no decode): the part every task shares.

    ``resampled=True`` draws shards with replacement per worker (``ResampledShardList``: for corpora
    with fewer shards than ranks x workers, or fixed-length epochs); a sample's caption is then drawn
    per visit from (seed, epoch, key, stream, visit). Without it, every sample appears exactly once per
    pass across ranks x workers and its first visit in an epoch is drawn from (seed, epoch, key).
    ``visits`` counts repeated visits (give the same object to ``EpochBatches``; default: a new one);
    ``blank_alt`` is the rule for blank alt-text (module docstring); ``errors`` receives the counts
    (default: the process-wide ``DATA_ERRORS``). ``p_mode="effective"`` reads each synthetic source's
    coverage from the attach reports beside the sidecars and raises its draw so the realized share
    is p where coverage allows (a warning says when it cannot). ``gate`` (``mixconfig.MixPlan.gate``) replaces
    the random draw by the score gate (``mix_mode: gate``); it cannot be combined with ``p_mode: effective``.
    ``pair_texts`` (``text_mode: both``) keeps the alt-text and adds a synthetic caption (``pair_captions``).
    """
    if pair_texts and (gate is not None or p_mode != PAPER):
        raise ValueError("text_mode=both trains on both captions: it takes no mix_mode=gate or p_mode=effective")
    check_blank_alt(blank_alt)
    if gate is not None and p_mode != PAPER:
        raise ValueError(f"mix_mode=gate realizes p by its threshold; p_mode={p_mode!r} does not apply (use paper)")
    for source in mixture.synthetic_sources:
        validate_name(source, "caption source")
    urls = expand_shards(shards)
    coverage = _coverage(urls, mixture, sidecar_dir, schedule, num_epochs) if check_p_mode(p_mode) != PAPER else None
    score_gate = None if gate is None else gate.build(urls, seed, sidecar_dir)  # the global quantile, once
    if resampled:
        stages: list = [ResampledShardList(urls, seed, epoch)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(shuffle_shards(urls, seed, epoch))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [
        read_shards(errors, ShardVisits() if visits is None else visits),
        attach_captions(mixture.synthetic_sources, sidecar_dir, errors),
        *([] if score_gate is None else [score_gate.stage]),
        pair_captions(mixture, seed, epoch, blank_alt, errors, resampled)
        if pair_texts
        else mix_captions(
            mixture, seed, epoch, schedule, num_epochs, blank_alt, errors, resampled, coverage, score_gate
        ),
    ]
    return stages


def _coverage(
    urls: list[str], mixture: Mixture, sidecar_dir: str | None, schedule: PSchedule | None, num_epochs: int
) -> dict[str, float]:
    """Coverage of the drawn synthetic sources (``p_mode: effective``); warns where p cannot be realized."""
    from caption_mixing.coverage import read_coverage

    drawn = [n for n, w in mixture.weights if n != ALT and w > 0]
    coverage = read_coverage(urls, drawn, sidecar_dir)
    ps = sorted({schedule.at_epoch(e, num_epochs) for e in range(num_epochs)}) if schedule else [None]
    for p in ps:
        mix = mixture if p is None else mixture.with_synthetic_share(p)
        raised, why = effective_mixture(mix, coverage)
        if why is not None:
            log.warning("%s", why)
        else:
            log.info("p_mode=effective: coverage %s, draws %s", coverage, raised.describe())
    return coverage


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
    p_mode: str = PAPER,
    gate: GateSpec | None = None,
    pair_texts: bool = False,
) -> torch.utils.data.IterableDataset:
    """The training input pipeline; iterate it (or wrap it in a DataLoader with batch_size=None).

    ``batches_per_epoch`` fixes the epoch length per worker in real batches (required with
    ``resampled``). Items follow the trainer contract in the module docstring (``iter_batches``).
    """
    if resampled and not batches_per_epoch:
        raise ValueError("resampled shards need batches_per_epoch (an epoch would never end)")
    errors, visits = DataErrors(), ShardVisits()
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
        visits=visits,
        p_mode=p_mode,
        gate=gate,
        pair_texts=pair_texts,
    )
    stages += [
        shuffle_samples(shuffle_buffer, seed, epoch),
        decode_images(errors),
        wds.map(to_training_tuple(image_transform, tokenizer, long_captions, seed, epoch)),
        batch_samples(batch_size, collate, partial=not drop_last, errors=errors),
    ]
    pipeline = wds.DataPipeline(*stages)
    return EpochBatches(pipeline, batches_per_epoch, visits) if batches_per_epoch else pipeline


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
