"""Helpers shared by the tests/test_eval_*.py files: a tiny open_clip config + checkpoint on disk.

No tests here; the config is registered under a test-only name so both our runner (in-process) and
clip_benchmark's CLI (subprocess, via --model-config-dir) can load the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

TINY_MODEL = "EvalTest-Tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_model(base: Path, seed: int = 0) -> tuple[Path, Path]:
    """(config dir, checkpoint path) for a random-init tiny CLIP whose predictions depend on the image."""
    config_dir = base / "model_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    with torch.no_grad():
        model.visual.conv1.weight.normal_(0, 0.1)
    ckpt = base / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return config_dir, ckpt
