"""The tiny open_clip model the testbed is sized for, registered with open_clip on import.

``EmbeddedCLIP-Tiny`` (64 px images, a 2-layer text tower) is what CLIP training, the
text-to-image application's embedded text encoder and the zero-shot evaluation use on the testbed.
Its config lives here, beside the data it fits, so all of them can name it without importing one
another: ``import testbed.models`` makes ``open_clip.create_model("EmbeddedCLIP-Tiny")`` work.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import open_clip

EMBEDDED_CLIP_MODEL = "EmbeddedCLIP-Tiny"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_registered: list[str] = []


def register() -> list[str]:
    """Add this package's model configs to open_clip's registry (once) and return their names."""
    if not _registered:
        names = sorted(f.stem for f in MODEL_CONFIG_DIR.glob("*.json"))
        if EMBEDDED_CLIP_MODEL not in names:
            raise FileNotFoundError(
                f"{MODEL_CONFIG_DIR / (EMBEDDED_CLIP_MODEL + '.json')}: missing (is the package data installed?)"
            )
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered.extend(names)
    return list(_registered)


def check_model_name(name: str, what: str = "model", hint: str = "") -> None:
    """An unknown open_clip model name is an error naming ``what``, the closest known names and all of them.

    Lives here because every part (both applications and evaluation) checks names against
    open_clip's registry plus the configs registered above.
    """
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        guess = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"{what} {name!r} is not an open_clip model config{guess}{hint} Valid models: {', '.join(names)}"
        )


register()
