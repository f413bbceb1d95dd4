"""Training inputs: caption-mixed image shards (encoded on the fly) or precomputed latent shards.

Both start with ``caption_sample_stages`` from caption_mixing, so the caption of every sample is
chosen by the same (seed, epoch, key) rule as in CLIP training. Latent shards keep the image
shards' stems, so their synthetic captions come from the image shards' sidecars (``sidecar_dir``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from caption_mixing.mixing import Mixture
from caption_mixing.pipeline import (
    SharedEpoch,
    caption_sample_stages,
    decode_image,
    shuffle_samples,
    take_data_errors,
)
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


def _to_tuple(field: str, transform=None):
    def fn(sample: dict) -> tuple:
        x = sample[field]
        return (
            transform(x) if transform is not None else x,
            sample["caption"],
            sample["__key__"],
            sample["caption_source"],
            sample["caption_wanted"],
        )

    return fn


def collate(samples: list[tuple]) -> dict[str, Any]:
    xs, captions, keys, sources, wanted = zip(*samples, strict=True)
    return {
        "x": torch.stack(xs),
        "captions": list(captions),
        "keys": list(keys),
        "sources": list(sources),
        "wanted": list(wanted),
        "data_errors": take_data_errors(),
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
) -> wds.DataPipeline:
    """Batches of ``x`` (images in [-1, 1] or latent moments) with the mixed caption of each sample."""
    stages = caption_sample_stages(
        shards, mixture=mixture, seed=seed, epoch=epoch, sidecar_dir=sidecar_dir, shuffle=shuffle_buffer > 0
    )
    stages.append(shuffle_samples(shuffle_buffer, seed, epoch))
    if latents:
        stages += [decode_latent(latent_shape), wds.map(_to_tuple("moments"))]
    else:
        stages += [decode_image, wds.map(_to_tuple("image", image_tensor_transform(resolution)))]
    stages.append(wds.batched(batch_size, collation_fn=collate, partial=False))
    return wds.DataPipeline(*stages)


def latents_sidecar_dir(pattern: str) -> str | None:
    """The image-shard folder recorded by ``precompute`` next to the latent shards (if any)."""
    from caption_mixing.shards import expand_shards

    first = Path(expand_shards(pattern)[0])
    manifest = first.parent / LATENTS_MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("sidecar_dir")
    return None
