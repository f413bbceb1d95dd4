"""Paper Table 5: CLIP similarity (100 x cosine) of generated images with their prompts.

For held-out samples, one image is generated from the original alt-text and one from the synthetic
caption; each is scored against the prompt it came from. Scores go through torchmetrics'
``CLIPScore`` (which accepts a callable returning ``(model, processor)``) with an adapter for
open_clip models, so any local open_clip checkpoint can be the judge; ``direct_clip_score`` is the
plain open_clip computation the adapter is checked against.

Distribution metrics (``distribution_metrics``) compare generated with held-out real images through
torchmetrics' ``FrechetInceptionDistance``/``KernelInceptionDistance``: with the judge CLIP's image
embeddings as the feature extractor (always available, nothing downloaded) and, when local Inception
weights are given (``fid_inception_weights``; needs torch-fidelity, the ``torchmetrics[image]`` extra),
the usual FID/KID.
"""

from __future__ import annotations

import io
import json
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
        """100 x cosine(image, its prompt) per image, through the same adapter and processor as CLIPScore
        (not clamped at 0, unlike CLIPScore's mean)."""
        img = self.image_features(images)
        txt = self.adapter.get_text_features(**self.processor(text=prompts))
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return [float(s) for s in 100 * (img * txt).sum(dim=-1)]

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (one row per image, any image sizes)."""
        pixels = torch.stack([self.processor.preprocess(i.convert("RGB")) for i in images])
        feats = self.adapter.get_image_features(pixels)
        return feats / feats.norm(dim=-1, keepdim=True)


class ClipImageFeatures(torch.nn.Module):
    """The judge CLIP as torchmetrics' ``feature=`` extractor: uint8 BCHW -> L2-normalised image embeddings."""

    def __init__(self, judge: ClipJudge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = int(self.forward(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[-1])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.image_features([Image.fromarray(i.permute(1, 2, 0).numpy()) for i in x])


def pil_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images])


@torch.no_grad()
def direct_clip_score(model, preprocess, tokenizer, images: list[Image.Image], prompts: list[str]) -> float:
    """Reference computation with open_clip alone: 100 x mean cosine(image, its prompt)."""
    img = model.encode_image(torch.stack([preprocess(i) for i in images]))
    txt = model.encode_text(tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return float(100 * cos.mean())


def _truth(sample: dict) -> dict | None:
    """The testbed's ground truth of a held-out scene (``{key}.json`` -> ``"testbed"``), None elsewhere."""
    try:
        truth = json.loads(sample["json"]).get("testbed") if "json" in sample else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return {k: truth[k] for k in ("category", "color", "count") if k in truth} if isinstance(truth, dict) else None


def holdout_prompts(shards: list[str], source: str, n: int, sidecar_dir: str | None = None) -> list[dict]:
    """The first ``n`` held-out samples that have both an alt-text and a ``source`` caption (in shard order),
    with the image and, on the testbed, the scene's truth (category, color, count)."""
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
        out.append({"key": sample["__key__"], "alt": alt, "synthetic": syn, "image": image, "truth": _truth(sample)})
        if len(out) == n:
            break
    if len(out) < n:
        log.warning("only %d held-out samples with a %s caption in %s (wanted %d)", len(out), source, shards, n)
    if not out:
        raise ValueError(f"holdout_shards {shards}: no sample has both an alt-text and a {source!r} caption")
    return out


class DistributionError(RuntimeError):
    """FID/KID were asked for (``fid_inception_weights``) but cannot run; the message says what is missing."""


def inception_features(weights: str) -> torch.nn.Module:
    """torchmetrics' Inception (torch-fidelity's FID network, 2048-d pool features) from a local weights file.

    The file is torch-fidelity's format: the state dict of ``FeatureExtractorInceptionV3``, e.g. its released
    ``pt_inception-2015-12-05-6726825d.pth``; with a path nothing is downloaded. One module serves FID and KID
    (torchmetrics' KID does not take a weights path, so it would download its own).
    """
    if not Path(weights).is_file():
        raise FileNotFoundError(f"fid_inception_weights={weights!r}: no such file")
    try:  # torch-fidelity unpickles the file with weights_only=False: refuse anything but plain tensors first
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistributionError(f"fid_inception_weights={weights!r} is not a plain tensor state dict: {e}") from e
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
        )
    except ModuleNotFoundError as e:
        raise DistributionError(
            f"fid_inception_weights={weights!r}: FID/KID need torch-fidelity ({e}); "
            "install it with `pip install 'torchmetrics[image]'` or `pip install torch-fidelity`"
        ) from e
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or wrong shapes
        raise DistributionError(
            f"fid_inception_weights={weights!r} is not a torch-fidelity FeatureExtractorInceptionV3 state dict: {e}"
        ) from e
    net.num_features = 2048  # tells torchmetrics the width without a dummy 299 px forward
    return net


def check_fid_backend() -> None:
    """Fail before training when FID/KID are configured but torch-fidelity is not installed."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise DistributionError(
            "fid_inception_weights is set but torch-fidelity is not installed: "
            "`pip install 'torchmetrics[image]'` (or `pip install torch-fidelity`)"
        )


def _update_by_size(metric, images: list[Image.Image], real: bool, batch: int = 32) -> None:
    """Feed uint8 images at their own size (the extractor resizes): one stacked batch per size."""
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for img in images:
        by_size.setdefault(img.size, []).append(img)
    for group in by_size.values():
        for start in range(0, len(group), batch):
            metric.update(pil_to_uint8(group[start : start + batch]), real=real)


def match_resolution(images: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Reference images as the model was trained to see them: resized (bicubic, shortest side) and
    center-cropped to the generated size, as reference batches for FID are prepared (ADM, clean-fid)."""
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop((size[1], size[0])),
        ]
    )
    return [tf(i.convert("RGB")) for i in images]


def frechet_distances(features: torch.nn.Module, real: list[Image.Image], sets: dict[str, list[Image.Image]]) -> dict:
    """torchmetrics FID with ``features`` as the extractor: each set against the same real images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fd = FrechetInceptionDistance(feature=features, reset_real_features=False, sync_on_compute=False)
    _update_by_size(fd, real, real=True)
    out = {}
    for name, images in sets.items():
        fd.reset()  # keeps the real statistics (reset_real_features=False)
        _update_by_size(fd, images, real=False)
        out[name] = float(fd.compute())
    return out


def kernel_distances(
    features: torch.nn.Module, real: list[Image.Image], sets: dict[str, list[Image.Image]], seed: int
) -> tuple[dict, int]:
    """torchmetrics KID (polynomial kernel, 100 random subsets) of each set against the real images.

    The subset size is the smallest set size (KID needs subsets no larger than either set); the subsets
    are drawn from a seeded generator so the numbers repeat."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(1000, len(real), *(len(v) for v in sets.values()))
    kid = KernelInceptionDistance(
        feature=features, subset_size=subset, reset_real_features=False, sync_on_compute=False
    )
    _update_by_size(kid, real, real=True)
    out = {}
    for name, images in sets.items():
        kid.reset()
        _update_by_size(kid, images, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            mean, std = kid.compute()
        out[name] = {"mean": float(mean), "std": float(std)}
    return out, subset


def distribution_metrics(
    judge: ClipJudge,
    real: list[Image.Image],
    sets: dict[str, list[Image.Image]],
    inception_weights: str | None = None,
    seed: int = 0,
) -> dict:
    """Distance of each image set from held-out real images: Fréchet distance between L2-normalised
    embeddings of the judge CLIP (always; no download), and FID/KID with a local Inception when
    ``inception_weights`` is given. Real images are matched to the generated size first; sample
    counts are recorded (and printed), since both estimates are biased at small n."""
    size = next(iter(sets.values()))[0].size
    counts = {"n_real": len(real), "n_generated": {k: len(v) for k, v in sets.items()}}
    out: dict = {"reference": "held-out real images", "resolution": list(size), **counts}
    if min(len(real), *counts["n_generated"].values()) < 2:
        return {**out, "skipped": "a Fréchet distance needs at least 2 real and 2 generated images"}
    real = match_resolution(real, size)
    print(
        f"distribution metrics: {len(real)} real vs "
        + ", ".join(f"{n} {k}" for k, n in counts["n_generated"].items())
        + f" images at {size[0]}x{size[1]} px",
        flush=True,
    )
    out["clip_fd"] = frechet_distances(ClipImageFeatures(judge), real, sets)
    if inception_weights:
        net = inception_features(inception_weights)
        out["fid"] = frechet_distances(net, real, sets)
        out["kid"], out["kid_subset_size"] = kernel_distances(net, real, sets, seed)
        out["inception_weights"] = str(inception_weights)
    return out
