"""Load an open_clip model from a local checkpoint, with errors that say which file or name is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch

from eval.classifier_cache import file_sha256
from testbed.models import check_model_name  # importing it registers EmbeddedCLIP-Tiny: --model needs no config dir


def _raised_while_reading(e: BaseException) -> bool:
    """True when ``e`` came from open_clip's ``load_state_dict`` (torch.load and state-dict extraction)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load_state_dict" and code.co_filename.replace("\\", "/").endswith("open_clip/factory.py"):
            return True
        tb = tb.tb_next
    return False


def _explain_load_error(e: Exception, checkpoint: Path, model_name: str) -> str:
    """One line saying whether the file is unreadable or its weights do not fit the model config."""
    text = str(e) or type(e).__name__
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Error(s)")), text)
    if _raised_while_reading(e):
        return f"--checkpoint {checkpoint} is not a readable open_clip checkpoint ({type(e).__name__}: {first[:200]})"
    return f"--checkpoint {checkpoint} does not fit --model {model_name}: {type(e).__name__}: {first[:300]}"


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
    check_model_name(
        model_name,
        "--model",
        " (open_clip's own and the project's EmbeddedCLIP-Tiny are known; for other configs pass "
        "--model-config-dir DIR with NAME.json files).",
    )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # open_clip fails with whatever torch.load / load_state_dict / its asserts raise
        raise ValueError(_explain_load_error(e, checkpoint, model_name)) from e
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer, preprocess, f"{model_name}@sha256:{file_sha256(checkpoint)}"
