"""Model construction through open_clip's own factory (plus the embedded tiny config)."""

from __future__ import annotations

import open_clip

from testbed.models import check_model_name  # importing testbed.models registers EmbeddedCLIP-Tiny


def create_model(name: str, device: str = "cpu", pretrained: str | None = None):
    """Return (model, train transform, eval transform, tokenizer) for an open_clip model name."""
    check_model_name(name, "model")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device
    )
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def create_model_meta(name: str):
    """Build ``name`` on the meta device: shapes and parameter counts without allocating weights
    (checks a paper-scale preset on a laptop)."""
    import torch

    check_model_name(name)
    with torch.device("meta"):
        return open_clip.create_model(name, device="meta")
