"""Load an open_clip model from a local checkpoint, with errors that say which file or name is wrong."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import open_clip

from eval.classifier_cache import file_sha256


def register_model_configs(config_dir: str | Path) -> list[str]:
    """``open_clip.add_model_config`` for every ``*.json`` in ``config_dir``; returns the model names added."""
    config_dir = Path(config_dir)
    files = sorted(config_dir.glob("*.json")) if config_dir.is_dir() else []
    if not files:
        raise ValueError(f"--model-config-dir {config_dir}: no *.json open_clip model configs there")
    for f in files:
        open_clip.add_model_config(f)
    return [f.stem for f in files]


def load_model(
    model_name: str, checkpoint: str | Path, *, device: str = "cpu", config_dir: str | Path | None = None
) -> tuple[Any, Any, Any, str]:
    """(model in eval mode, tokenizer, eval transform, model id = name + checkpoint sha256)."""
    if config_dir:
        register_model_configs(config_dir)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no such file")
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"--model {model_name!r} is not an open_clip model config{hint} (custom configs: pass --model-config-dir)"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e):
            first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
            raise ValueError(f"--checkpoint {checkpoint} does not fit --model {model_name}: {first[:300]}") from e
        raise
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer, preprocess, f"{model_name}@sha256:{file_sha256(checkpoint)}"
