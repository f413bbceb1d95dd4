"""Training inputs: caption-mixed image shards (encoded on the fly) or precomputed latent shards.

Both start with ``caption_sample_stages`` from caption_mixing, so the caption of every sample is
chosen by the same (seed, epoch, key) rule as in CLIP training (a repeated visit in an epoch draws
again, see ``caption_mixing.pipeline.ShardVisits``), with the same options (n-way
mixtures, fallback order, ``mix_mode``, ``p_schedule``); captions longer than the text encoder's
context are fitted by the same ``long_captions`` policy. Latent shards keep the image shards'
stems, so their synthetic captions come from the image shards' sidecars (``sidecar_dir``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from caption_mixing.long_captions import fit_caption
from caption_mixing.mixing import Mixture
from caption_mixing.pipeline import (
    DRAW_KEY,
    DataErrors,
    EpochBatches,
    ShardVisits,
    SharedEpoch,
    batch_samples,
    caption_sample_stages,
    decode_images,
    shuffle_samples,
)
from caption_mixing.schedules import PSchedule
from t2i.embedded import image_tensor_transform

log = logging.getLogger(__name__)

LATENT_MEMBER = "latent.npy"  # posterior (mean, logvar) stacked on channels, float16
LATENTS_MANIFEST = "latents.json"


class LatentShapeError(ValueError):
    """A latent shard made for another resolution or VAE than the preset."""


def decode_latent(expected: tuple[int, int, int]):
    """Stage: ``{key}.latent.npy`` -> ``sample["moments"]`` tensor; a shape mismatch names the shard."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            raw = sample.get(LATENT_MEMBER)
            if raw is None:
                raise LatentShapeError(
                    f"latent shard {sample.get('__url__')}: sample {sample.get('__key__')} has no "
                    f"{LATENT_MEMBER} member; is this an image shard? (set train_shards, not train_latents)"
                )
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            if tuple(arr.shape) != expected:
                raise LatentShapeError(
                    f"latent shard {sample.get('__url__')}: sample {sample.get('__key__')} has latent shape "
                    f"{tuple(arr.shape)}, the preset expects {expected} (2 x latent_channels, latent_size, "
                    "latent_size); precompute it again with this preset's vae and resolution"
                )
            sample["moments"] = torch.from_numpy(arr.astype(np.float32))
            yield sample

    return stage


@dataclass(frozen=True)
class CaptionFit:
    """The ``long_captions`` policy with the text encoder's token counter and context (``head``: unchanged)."""

    policy: str = "head"
    count_tokens: Callable[[str], int] | None = None
    max_tokens: int = 0
    seed: int = 0

    def __call__(self, caption: str, epoch: int, key: str) -> str:
        if self.policy == "head" or self.count_tokens is None:
            return caption
        return fit_caption(caption, self.policy, self.count_tokens, self.max_tokens, self.seed, epoch, key)


def _to_tuple(field: str, fit: CaptionFit, epoch: SharedEpoch, transform=None):
    def fn(sample: dict) -> tuple:
        x, draw = sample[field], sample.get(DRAW_KEY, sample["__key__"])
        return (
            transform(x) if transform is not None else x,
            fit(sample["caption"], epoch.get(), draw),
            sample["__key__"],
            sample["caption_source"],
            sample["caption_wanted"],
            draw,
        )

    return fn


def collate(samples: list[tuple]) -> dict[str, Any]:
    """``draws``: what each sample's per-visit draws hash (its key on a first visit; see ``visit_key``)."""
    xs, captions, keys, sources, wanted, draws = zip(*samples, strict=True)
    return {
        "x": torch.stack(xs),
        "captions": list(captions),
        "keys": list(keys),
        "sources": list(sources),
        "wanted": list(wanted),
        "draws": list(draws),
    }


def build_t2i_pipeline(
    shards: str | list[str],
    *,
    latents: bool,
    mixture: Mixture,
    seed: int,
    epoch: SharedEpoch,
    batch_size: int,
    resolution: int,
    latent_shape: tuple[int, int, int],
    shuffle_buffer: int = 1000,
    sidecar_dir: str | None = None,
    schedule: PSchedule | None = None,
    num_epochs: int = 1,
    fit: CaptionFit = CaptionFit(),
    blank_alt: str = "fallback",
    batches_per_epoch: int | None = None,
    p_mode: str = "paper",
    gate: object | None = None,
) -> torch.utils.data.IterableDataset:
    """Batches of ``x`` (images in [-1, 1] or latent moments) with the mixed caption of each sample.

    ``schedule`` sets p per epoch (``num_epochs`` is the run's length in epochs); ``fit`` shortens
    captions longer than the text context; ``blank_alt`` is the rule for blank alt-text; ``p_mode``
    ``"effective"`` raises the draw by each source's attach coverage; ``batches_per_epoch`` fixes an
    epoch's length per worker. Items follow caption_mixing's trainer contract: every batch carries
    ``data_errors``, and counts left after a worker's last batch come in an errors-only item
    (``caption_mixing.pipeline.iter_batches`` handles both).
    """
    errors, visits = DataErrors(), ShardVisits()
    stages = caption_sample_stages(
        shards,
        mixture=mixture,
        seed=seed,
        epoch=epoch,
        sidecar_dir=sidecar_dir,
        shuffle=shuffle_buffer > 0,
        schedule=schedule,
        num_epochs=num_epochs,
        blank_alt=blank_alt,
        errors=errors,
        visits=visits,
        p_mode=p_mode,
        gate=gate,  # mix_mode=gate (caption_mixing.gate.GateSpec)
    )
    stages.append(shuffle_samples(shuffle_buffer, seed, epoch))
    if latents:
        stages += [decode_latent(latent_shape), wds.map(_to_tuple("moments", fit, epoch))]
    else:
        transform = image_tensor_transform(resolution)
        stages += [decode_images(errors), wds.map(_to_tuple("image", fit, epoch, transform))]
    stages.append(batch_samples(batch_size, collate, partial=False, errors=errors))
    pipeline = wds.DataPipeline(*stages)
    return EpochBatches(pipeline, batches_per_epoch, visits) if batches_per_epoch else pipeline


def latents_sidecar_dir(pattern: str) -> str | None:
    """The image-shard folder recorded by ``precompute`` next to the latent shards (if any)."""
    from caption_mixing.shards import expand_shards

    first = Path(expand_shards(pattern)[0])
    manifest = first.parent / LATENTS_MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("sidecar_dir")
    return None
