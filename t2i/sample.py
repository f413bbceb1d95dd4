"""Export a trained model as a diffusers pipeline folder and sample from it.

The folder is a plain ``PixArtAlphaPipeline`` (transformer with EMA weights, VAE, text encoder,
tokenizer, DPM-Solver scheduler): ``DiffusionPipeline.from_pretrained(folder)`` loads it offline.
``t2i.json`` beside ``model_index.json`` records the text context (``max_sequence_length``), which
the pipeline must be given for CLIP text encoders (its default, 120, is T5's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from caption_mixing.atomic import atomic_write_json
from caption_mixing.paths import check_output_dir
from t2i.components import TextEncoder
from t2i.config import T2IConfig, check_sample_steps
from t2i.model import sample_scheduler
from training.device import resolve_device

PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
META = "t2i.json"


class PipelineError(ValueError):
    """A pipeline folder that is missing a component; the message names it."""


class _ExpectedDiffusersWarnings(logging.Filter):
    """Drops two diffusers warnings that are expected here and would flood a sweep's log: the PixArt pipeline
    holds a CLIP text encoder where it declares T5 (deliberate), and every prompt longer than the text context
    is echoed whole, per batch (truncation is counted instead: ``truncated_prompts``). Others pass."""

    MESSAGES = ("Expected types for text_encoder", "The following part of your input was truncated")
    LOGGERS = ("diffusers.pipelines.pipeline_utils", "diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGES)


_QUIET = _ExpectedDiffusersWarnings()


def quiet_expected_warnings() -> None:
    """Install the filter (idempotent: ``addFilter`` skips a filter already there)."""
    for name in _QUIET.LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)


def export_pipeline(out: Path, cfg: T2IConfig, transformer, vae, text: TextEncoder) -> Path:
    """Save a PixArtAlphaPipeline folder atomically (written beside, then renamed into place)."""
    from diffusers import PixArtAlphaPipeline

    quiet_expected_warnings()
    pipe = PixArtAlphaPipeline(
        tokenizer=text.tokenizer,
        text_encoder=text.model,
        vae=vae,
        transformer=transformer,
        scheduler=sample_scheduler(cfg),
    )
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    atomic_write_json(
        tmp / META,
        {
            "max_sequence_length": text.max_length,
            "resolution": cfg.resolution,
            "p": cfg.p,
            "synthetic_source": cfg.synthetic_source,
            "guidance_scale": cfg.guidance_scale,
            "sample_steps": cfg.sample_steps,
        },
    )
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def check_pipeline_folder(folder: Path) -> dict:
    """model_index.json and every component folder must exist; returns the t2i.json metadata (or {})."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise PipelineError(f"--pipeline {folder}: no model_index.json; not a diffusers pipeline folder")
    listed = json.loads(index.read_text())
    for name in PIPELINE_COMPONENTS:
        if name not in listed or listed[name] in (None, [None, None]):
            raise PipelineError(f"--pipeline {folder}: model_index.json lists no {name!r} component")
        if not (folder / name).is_dir() or not any((folder / name).iterdir()):
            raise PipelineError(f"--pipeline {folder}: component {name!r} is missing (no folder {folder / name})")
    meta = folder / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_pipeline(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """(pipeline, metadata): loads offline through DiffusionPipeline.from_pretrained, from safetensors
    unless ``allow_pickle`` (a component folder with only pickle weights is refused, naming it)."""
    from diffusers import DiffusionPipeline

    from t2i.components import use_safetensors

    meta = check_pipeline_folder(folder)
    weighted = ("transformer", "vae", "text_encoder")
    safe = all([use_safetensors(Path(folder) / name, f"--pipeline {name}", allow_pickle) for name in weighted])
    quiet_expected_warnings()
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype, use_safetensors=safe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), meta


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    max_sequence_length: int,
    steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int = 0,
    batch_size: int = 16,
    resolution: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i always gets seed + i, so results do not depend on batching."""
    check_sample_steps(steps, "steps")
    size = resolution or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
        out = pipe(
            prompt=chunk,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            height=size,
            width=size,
            max_sequence_length=max_sequence_length,
            clean_caption=False,
            use_resolution_binning=False,
        )
        images.extend(out.images)
    return images


def vae_roundtrip(pipe) -> Callable[[list[Image.Image]], list[Image.Image]]:
    """Images -> the pipeline's VAE (posterior mean) -> decoded images, resized and cropped as training data is.

    What the latent space keeps of a real image: a generator that decodes through this VAE can do no better,
    so the judge's score on these is the pipeline's own ceiling (the embedded VAE, for one, shifts colours).
    """
    from t2i.embedded import image_tensor_transform

    tf = image_tensor_transform(pipe.transformer.config.sample_size * pipe.vae_scale_factor)

    @torch.no_grad()
    def run(images: list[Image.Image]) -> list[Image.Image]:
        x = torch.stack([tf(im.convert("RGB")) for im in images]).to(pipe.vae.device, pipe.vae.dtype)
        decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        return pipe.image_processor.postprocess(decoded.float(), output_type="pil")

    return run


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (blank lines skipped), or a JSON list / JSONL with a "prompt" field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = json.loads(text)
    elif path.suffix == ".jsonl":
        prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return [str(p) for p in prompts]


def sample_to_folder(
    pipeline: Path,
    prompts_file: Path,
    out: Path,
    steps: int,
    guidance_scale: float,
    seed: int,
    device: str | None = None,
    allow_pickle: bool = False,
) -> list[Path]:
    """The ``sample`` command: PNGs ``{i:05d}.png`` + ``prompts.jsonl`` + ``grid.png`` in ``out``."""
    out = check_output_dir(out, "--out")  # before the slow part
    check_sample_steps(steps, "--steps")
    device = resolve_device(device)
    prompts = read_prompts(prompts_file)
    pipe, meta = load_pipeline(pipeline, device, allow_pickle=allow_pickle)
    max_len = int(meta.get("max_sequence_length", pipe.tokenizer.model_max_length))
    n_trunc = sum(len(pipe.tokenizer(p).input_ids) > max_len for p in prompts)
    if n_trunc:
        print(f"{n_trunc} of {len(prompts)} prompts are longer than {max_len} tokens and were truncated")
    images = generate(pipe, prompts, max_sequence_length=max_len, steps=steps, guidance_scale=guidance_scale, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    lines = []
    for i, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        path = out / f"{i:05d}.png"
        img.save(path)
        paths.append(path)
        lines.append(json.dumps({"file": path.name, "prompt": prompt, "seed": seed + i}))
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    image_grid(images[:64], cols=min(8, len(images))).save(out / "grid.png")
    return paths
