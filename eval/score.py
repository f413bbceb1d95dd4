"""Per-sample image-text alignment scores for ``mix_mode: gate`` (``caption_mixing.gate``).

``python -m eval score --shards ... --sources alt,altogether --model NAME --checkpoint PATH`` computes,
for every sample and each caption source, the cosine between the image and text embeddings of a local
open_clip model, streaming shard by shard. It writes one numeric sidecar per shard and source, in the
form of an attached release score (``caption_mixing.sidecar`` format 2: ``{"fields": {"clip_score":
{key: cosine}}}``), named ``{shard_stem}.clip_score_{source}.json`` (``--name`` changes ``clip_score``).
A sidecar is written atomically, so one that exists and reads back with its field is complete: a
rerun skips it (resumable). A source holding several captions per image scores their mean.

Scoring loads a model, so it lives with evaluation; ``caption_mixing`` only reads the result. The
scorer must be trained on data disjoint from the run it gates (never the run's own model).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from caption_mixing import storage
from caption_mixing.atomic import atomic_write_json
from caption_mixing.mixing import ALT
from caption_mixing.paths import validate_name
from caption_mixing.shards import expand_shards, read_tar_samples
from caption_mixing.sidecar import SidecarError, load_sidecar, read_sidecar_fields, sidecar_path, write_sidecar

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_NAME = "clip_score"


def score_source_name(name: str, source: str) -> str:
    """The sidecar source of ``source``'s scores: ``clip_score_alt`` (``gate_scores`` names it)."""
    return validate_name(f"{validate_name(name, '--name')}_{validate_name(source, '--sources')}", "--name/--sources")


def is_complete(shard: str, name: str, source: str, out_dir: str | None) -> bool:
    """A score sidecar that exists, belongs to ``shard`` and holds the field: atomic writes make it whole."""
    path = sidecar_path(shard, score_source_name(name, source), out_dir)
    if not storage.exists(path):
        return False
    try:
        return name in read_sidecar_fields(path, shard=shard)
    except SidecarError as e:
        log.warning("rescoring %s: %s", path, e)
        return False


def _samples(shard: str) -> Iterator[tuple[str, Image.Image, str]]:
    """(key, RGB image, alt-text) of each readable sample; undecodable images are skipped with a warning."""
    for sample in read_tar_samples(shard, want=(*IMAGE_EXTS, "txt")):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            continue
        try:
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
        except Exception as e:  # PIL raises many types for bad bytes
            log.warning("%s: sample %s: image not decodable (%s): not scored", shard, sample["__key__"], e)
            continue
        yield sample["__key__"], image, (sample.get("txt") or b"").decode("utf-8", errors="replace")


def _texts_of(caption: Any) -> list[str]:
    if isinstance(caption, str):
        return [caption] if caption.strip() else []
    if isinstance(caption, list):
        return [c for c in caption if isinstance(c, str) and c.strip()]
    return []


@torch.no_grad()
def _score_batch(
    model: Any, tokenizer: Callable, images: torch.Tensor, texts: list[list[str]], device: str
) -> list[float | None]:
    """Cosine of each image with (the mean over) its texts; None where a sample has no text."""
    img = torch.nn.functional.normalize(model.encode_image(images.to(device)).float(), dim=-1)
    flat = [(i, t) for i, ts in enumerate(texts) for t in ts]
    if not flat:
        return [None] * len(texts)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer([t for _, t in flat]).to(device)).float(), dim=-1)
    sums = torch.zeros(len(texts), dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    owner = torch.tensor([i for i, _ in flat])
    cos = (img[owner] * txt).sum(-1).double().cpu()
    sums.index_add_(0, owner, cos)
    counts.index_add_(0, owner, torch.ones_like(cos))
    return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]


def score_shard(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    shard: str,
    sources: list[str],
    *,
    name: str = DEFAULT_NAME,
    sidecar_dir: str | None = None,
    out_dir: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, int]:
    """Score one shard for ``sources``; write one sidecar per source; returns samples scored per source."""
    tables = {s: ({} if s == ALT else (load_sidecar(shard, s, sidecar_dir) or {})) for s in sources}
    scores: dict[str, dict[str, float]] = {s: {} for s in sources}
    batch: list[tuple[str, Image.Image, str]] = []

    def flush() -> None:
        images = torch.stack([preprocess(im) for _, im, _ in batch])
        for source in sources:
            texts = [_texts_of(alt if source == ALT else tables[source].get(key)) for key, _, alt in batch]
            for (key, _, _), value in zip(batch, _score_batch(model, tokenizer, images, texts, device), strict=True):
                if value is not None:
                    scores[source][key] = value
        batch.clear()

    for item in _samples(shard):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    for source in sources:
        path = sidecar_path(shard, score_source_name(name, source), out_dir)
        write_sidecar(path, shard, score_source_name(name, source), {}, fields={name: scores[source]})
    return {s: len(v) for s, v in scores.items()}


def score_shards(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    shards: str | list[str],
    sources: list[str],
    *,
    model_id: str,
    name: str = DEFAULT_NAME,
    sidecar_dir: str | None = None,
    out_dir: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Score every shard not already complete (resumable); writes ``{name}.scorer.json`` beside the
    first score sidecar naming the model, so a gate's report can say which scorer it used."""
    for source in sources:
        score_source_name(name, source)
    urls = expand_shards(shards)
    done, scored, counts = [], [], {s: 0 for s in sources}
    for url in urls:
        todo = [s for s in sources if not is_complete(url, name, s, out_dir)]
        if not todo:
            done.append(url)
            continue
        for s, n in score_shard(
            model, tokenizer, preprocess, url, todo, name=name, sidecar_dir=sidecar_dir, out_dir=out_dir,
            device=device, batch_size=batch_size,
        ).items():  # fmt: skip
            counts[s] += n
        scored.append(url)
    summary = {"model": model_id, "name": name, "sources": sources, "shards": len(urls), "skipped": len(done)}
    summary.update(scored_shards=len(scored), samples_scored=counts)
    where = sidecar_path(urls[0], score_source_name(name, sources[0]), out_dir) if urls else None
    if isinstance(where, Path):
        atomic_write_json(where.parent / f"{name}.scorer.json", summary)
    return summary


def run_score_cli(args: Any) -> dict[str, Any]:
    """``python -m eval score``: load the model (``eval.model_loading``) and score."""
    from eval.model_loading import load_model

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not sources:
        raise ValueError("--sources: name at least one caption source, e.g. alt,altogether")
    for s in sources:
        score_source_name(args.name, s)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, preprocess, model_id = load_model(
        args.model, args.checkpoint, device=device, config_dir=args.model_config_dir
    )
    return score_shards(
        model, tokenizer, preprocess, args.shards, sources, model_id=model_id, name=args.name,
        sidecar_dir=args.sidecar_dir, out_dir=args.out, device=device, batch_size=args.batch_size,
    )  # fmt: skip
