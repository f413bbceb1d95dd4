"""Paper Table 5: CLIP similarity (100 x cosine) of generated images with their prompts.

For held-out samples, one image is generated from the original alt-text and one from the synthetic
caption; each is scored against the prompt it came from. Scores go through torchmetrics'
``CLIPScore`` (which accepts a callable returning ``(model, processor)``) with an adapter for
open_clip models, so any local open_clip checkpoint can be the judge; ``direct_clip_score`` is the
plain open_clip computation the adapter is checked against. FID (torchmetrics) runs only when
local Inception weights are given.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from caption_mixing.mixing import ALT
from caption_mixing.pipeline import attach_captions

log = logging.getLogger(__name__)


class OpenClipForCLIPScore(torch.nn.Module):
    """Gives an open_clip model the two methods torchmetrics' CLIPScore calls."""

    def __init__(self, model: torch.nn.Module, context_length: int) -> None:
        super().__init__()
        self.clip = model.eval()
        # CLIPScore reads config.text_config.max_position_embeddings to cut over-long token rows.
        self.config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=context_length))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.encode_text(input_ids)  # open_clip's causal tower ignores padding by construction


class OpenClipProcessor:
    """The processor half: uint8 CHW tensors -> open_clip eval transform; text -> open_clip tokens."""

    def __init__(self, preprocess, tokenizer) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context = getattr(tokenizer, "context_length", 77)

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts longer than the text context (open_clip truncates them, keeping the end token).

        Counted once per prompt list, not per call: scoring calls the processor several times
        for the same prompts (mean score, per-image scores, reference images).
        """
        raw = getattr(self.tokenizer, "encode", None)
        return 0 if raw is None else sum(len(raw(t)) + 2 > self.context for t in prompts)

    def __call__(self, text=None, images=None, return_tensors: str = "pt", padding: bool = True) -> dict:
        if images is not None:
            pils = [Image.fromarray(img.permute(1, 2, 0).to(torch.uint8).numpy()) for img in images]
            return {"pixel_values": torch.stack([self.preprocess(p) for p in pils])}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_open_clip(model_name: str, checkpoint: str | None, device: str = "cpu"):
    """(model, eval transform, tokenizer) from a local checkpoint; nothing is downloaded.

    The checkpoint is read with ``weights_only=True``; one of another architecture, or a file that
    is not a checkpoint, raises an error naming it.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from t2i.components import create_open_clip
    from training.checkpoint import load_checkpoint, load_model_state

    if not checkpoint or not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"eval_clip_checkpoint={checkpoint!r}: a local open_clip checkpoint file is required for "
            f"eval_clip_model={model_name!r} (nothing is fetched from a hub)"
        )
    model = create_open_clip(model_name, device)
    state = load_checkpoint(Path(checkpoint))
    if "state_dict" not in state:  # a bare state dict (open_clip's released .pt files)
        state = {"state_dict": state}
    load_model_state(model, state, model_name, Path(checkpoint))
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


class ClipJudge:
    """CLIPScore over an open_clip model; ``score(images, prompts)`` -> per-image 100 x cosine."""

    def __init__(self, model, preprocess, tokenizer) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.processor = OpenClipProcessor(preprocess, tokenizer)
        self.adapter = OpenClipForCLIPScore(model, self.processor.context)
        # Rank 0 alone evaluates a multi-process run: no cross-rank sync (it would wait for the others).
        self.metric = CLIPScore(model_name_or_path=lambda: (self.adapter, self.processor), sync_on_compute=False)

    @torch.no_grad()
    def mean_score(self, images: list[Image.Image], prompts: list[str]) -> float:
        """torchmetrics CLIPScore: max(100 x mean cosine, 0)."""
        self.metric.reset()
        self.metric.update(pil_to_uint8(images), prompts)
        return float(self.metric.compute())

    @torch.no_grad()
    def per_image(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        score, _ = _clip_score_update(pil_to_uint8(images), prompts, self.adapter, self.processor)
        return [float(s) for s in score]


def pil_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images])


@torch.no_grad()
def direct_clip_score(model, preprocess, tokenizer, images: list[Image.Image], prompts: list[str]) -> float:
    """Reference computation with open_clip alone: 100 x mean cosine(image, its prompt)."""
    img = model.encode_image(torch.stack([preprocess(i) for i in images]))
    txt = model.encode_text(tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return float(100 * cos.mean())


def holdout_prompts(shards: list[str], source: str, n: int, sidecar_dir: str | None = None) -> list[dict]:
    """The first ``n`` held-out samples that have both an alt-text and a ``source`` caption (in shard order)."""
    pipe = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.tarfile_to_samples(), attach_captions((source,), sidecar_dir)
    )
    out = []
    for sample in pipe:
        alt, syn = sample["captions"][ALT], sample["captions"].get(source)
        if not alt.strip() or not syn or not syn.strip():
            continue
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        image = Image.open(io.BytesIO(sample[ext])).convert("RGB") if ext else None
        out.append({"key": sample["__key__"], "alt": alt, "synthetic": syn, "image": image})
        if len(out) == n:
            break
    if len(out) < n:
        log.warning("only %d held-out samples with a %s caption in %s (wanted %d)", len(out), source, shards, n)
    if not out:
        raise ValueError(f"holdout_shards {shards}: no sample has both an alt-text and a {source!r} caption")
    return out


def fid_score(real: list[Image.Image], fake: list[Image.Image], weights: str) -> float:
    """FID with torchmetrics' Inception from a local weights file (never downloaded)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not Path(weights).is_file():
        raise FileNotFoundError(f"fid_inception_weights={weights!r}: no such file")
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, sync_on_compute=False)
    size = 299
    for batch, is_real in ((real, True), (fake, False)):
        x = pil_to_uint8([i.resize((size, size), Image.BICUBIC) for i in batch])
        fid.update(x, real=is_real)
    return float(fid.compute())
