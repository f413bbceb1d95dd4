"""The tiny open_clip model the testbed is sized for, registered with open_clip on import.

``EmbeddedCLIP-Tiny`` (64 px images, a 2-layer text tower) is what CLIP training, the
text-to-image application's embedded text encoder and the zero-shot evaluation use on the testbed.
Its config lives here, beside the data it fits, so all of them can name it without importing one
another: ``import testbed.models`` makes ``open_clip.create_model("EmbeddedCLIP-Tiny")`` work.
"""

from __future__ import annotations

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


register()
