"""The CLIP training input: epoch-length planning and the caption-mixed WebDataset loader.

With DDP every rank must run the same number of steps, but shards split unevenly. The epoch is
therefore explicit: ``steps_per_epoch = train_num_samples // batch_size`` (or the data's known
size), and each rank's pipeline is cut (and, when its shards run short, repeated) to
``steps_per_epoch * accum_freq`` micro-batches with WebDataset's ``with_epoch``, as open_clip does
with ``--train-num-samples``. A single process with unknown data size makes one pass per epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from caption_mixing import SharedEpoch, build_caption_pipeline, expand_shards, make_loader
from caption_mixing.mixconfig import mixing_plan
from clip_train.config import ClipTrainConfig
from training.distributed import DistEnv


class EpochPlan(NamedTuple):
    """Per-rank micro-batch size, micro-batches per epoch per rank, batches per loader worker
    (the last two None for a natural one-pass epoch)."""

    local_batch_size: int
    micro_per_epoch: int | None
    worker_batches: int | None


def known_num_samples(shards: str) -> int | None:
    """Sample count from metadata beside the shards: open_clip's ``sizes.json`` or img2dataset's
    ``*_stats.json`` (``successes``). None when any shard is not covered (never guessed)."""
    urls = expand_shards(shards, check_exists=False)
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file.exists():
            sizes = sizes_cache.setdefault(sizes_file, json.loads(sizes_file.read_text()))
            if path.name in sizes:
                total += int(sizes[path.name])
                continue
        stats = path.with_name(f"{path.stem}_stats.json")
        if stats.exists():
            total += int(json.loads(stats.read_text()).get("successes", 0))
            continue
        return None
    return total


def plan_epoch(cfg: ClipTrainConfig, env: DistEnv, shards: str, num_samples: int | None) -> EpochPlan:
    """The epoch layout; refuses layouts that would give ranks unequal step counts."""
    local_bs = cfg.local_batch_size(env.world_size)
    n = cfg.train_num_samples or num_samples or known_num_samples(shards)
    if n is None:
        if env.distributed:
            raise ValueError(
                f"train_num_samples is not set and the size of {shards} is unknown; with {env.world_size} "
                "ranks every rank needs the same steps per epoch: pass --set train_num_samples=N"
            )
        if cfg.p_schedule is not None:
            raise ValueError(
                f"p_schedule={cfg.p_schedule!r} needs a known epoch length: pass --set train_num_samples=N"
            )
        return EpochPlan(local_bs, None, None)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train_num_samples={n} is less than one global batch (batch_size={cfg.batch_size})")
    if not cfg.resampled:
        n_shards = len(expand_shards(shards, check_exists=False))
        readers = env.world_size * max(1, cfg.workers)
        if n_shards < readers:
            raise ValueError(
                f"{n_shards} shards cannot feed {env.world_size} ranks x {max(1, cfg.workers)} workers: "
                "lower --set workers, or --set resampled=true"
            )
    micro = steps_per_epoch * cfg.accum_freq
    return EpochPlan(local_bs, micro, math.ceil(micro / max(1, cfg.workers)))


def build_loader(
    cfg: ClipTrainConfig,
    shards: str,
    sidecar_dir: str | None,
    plan: EpochPlan,
    epoch: SharedEpoch,
    image_transform: Any,
    tokenizer: Any,
) -> torch.utils.data.DataLoader:
    """The caption-mixed pipeline of this rank (mixing resolved once, by ``mixing_plan``) in a DataLoader."""
    mix = mixing_plan(cfg)
    num_epochs = math.ceil(cfg.steps * cfg.accum_freq / plan.micro_per_epoch) if plan.micro_per_epoch else 1
    pipeline = build_caption_pipeline(
        shards,
        mixture=mix.mixture,
        schedule=mix.schedule,
        num_epochs=num_epochs,
        long_captions=mix.long_captions,
        blank_alt=mix.blank_alt,
        p_mode=mix.p_mode,
        gate=mix.gate,
        pair_texts=cfg.text_mode == "both",
        seed=cfg.seed,
        epoch=epoch,
        image_transform=image_transform,
        tokenizer=tokenizer,
        batch_size=plan.local_batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        sidecar_dir=sidecar_dir,
        resampled=cfg.resampled,
        batches_per_epoch=plan.worker_batches,
    )
    return make_loader(pipeline, cfg.workers)


def to_device(batch: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, token ids) of a batch on the training device; with ``text_mode: both`` the token ids are the
    B alt-texts then the B synthetic captions (2B rows: ``clip_train.step.BothCaptionsLoss`` splits them)."""
    texts = batch["texts"] if "texts_pair" not in batch else torch.cat([batch["texts"], batch["texts_pair"]])
    return batch["images"].to(device, non_blocking=True), texts.to(device, non_blocking=True)


def check_epoch_end(env: DistEnv, last: int, plan: EpochPlan, shards: str, epoch: int) -> None:
    """An epoch that yielded nothing, or fewer micro-batches than planned, is an error naming the shards."""
    if last == 0:
        raise RuntimeError(
            f"rank {env.rank}: the training data yielded no batch of {plan.local_batch_size} (shards: {shards})"
        )
    if plan.micro_per_epoch is not None and last < plan.micro_per_epoch:
        raise RuntimeError(
            f"rank {env.rank}: epoch {epoch} ended after {last} of {plan.micro_per_epoch} micro-batches; "
            f"its shards of {shards} yield too few samples (check train_num_samples)"
        )
