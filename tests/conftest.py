"""Shared fixtures: tiny img2dataset-style shards with caption sidecars, written per test."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from caption_mixing.sidecar import sidecar_path, write_sidecar


def signal_self_after_first_checkpoint(ckpt_dir: Path, sig: int = signal.SIGUSR1) -> None:
    """Send ``sig`` to this process (a trainer on its main thread) once ``ckpt_dir`` holds a checkpoint."""
    from training.checkpoint import list_checkpoints

    def wait_then_signal() -> None:
        while not list_checkpoints(ckpt_dir):
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait_then_signal, daemon=True).start()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(
    root: Path,
    n_shards: int = 4,
    per_shard: int = 50,
    source: str = "altogether",
    missing: frozenset[str] = frozenset(),
    blank: frozenset[str] = frozenset(),
) -> tuple[str, list[str]]:
    """Write shards ``root/0000i.tar`` and their ``source`` sidecars; return (brace pattern, keys)."""
    root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    img = jpeg_bytes((200, 30, 30))
    for s in range(n_shards):
        shard = root / f"{s:05d}.tar"
        captions = {}
        with tarfile.open(shard, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                keys.append(key)
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", f"alt text {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
                if key in missing:
                    continue
                captions[key] = "" if key in blank else f"a dense synthetic caption of sample {key}"
        write_sidecar(sidecar_path(shard, source), shard, source, captions)
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar"), keys


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, list[str]]:
    return make_shards(tmp_path / "shards")


# ---------------------------------------------------------------------------------------------
# Text-to-image on tiny shards with random tiny components (shared by the t2i and Slurm tests)
# ---------------------------------------------------------------------------------------------

TINY_T2I = {
    "resolution": 16,
    "latent_size": 4,
    "hidden_size": 32,
    "num_heads": 2,
    "num_layers": 1,
    "batch_size": 8,
    "max_steps": 3,
    "warmup_steps": 1,
    "checkpoint_every": 2,
    "log_every": 1,
    "workers": 0,
    "shuffle_buffer": 10,
    "eval_prompts": 3,
    "sample_steps": 2,
    "grid_prompts": 2,
    "eval_clip_model": "EmbeddedCLIP-Tiny",
}


def tiny_t2i_world(root: Path) -> dict:
    """Tiny shards with sidecars, a random CLIP (checkpoint + exported text tower) and a random tiny VAE."""
    import torch

    from clip_train.model import create_model
    from t2i.components import export_open_clip_text
    from t2i.embedded import tiny_vae

    pattern, keys = make_shards(root / "shards", n_shards=2, per_shard=20, missing=frozenset({"000000003"}))
    holdout, _ = make_shards(root / "holdout", n_shards=1, per_shard=6)
    torch.manual_seed(0)
    clip, _, _, _ = create_model("EmbeddedCLIP-Tiny")
    torch.save({"state_dict": clip.state_dict(), "model_name": "EmbeddedCLIP-Tiny"}, root / "clip.pt")
    export_open_clip_text(root / "clip.pt", "EmbeddedCLIP-Tiny", root / "text")
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    overrides = {
        **TINY_T2I,
        "train_shards": pattern,
        "holdout_shards": holdout,
        "vae": str(root / "vae"),
        "text_encoder": str(root / "text"),
        "eval_clip_checkpoint": str(root / "clip.pt"),
    }
    return {"root": root, "pattern": pattern, "keys": keys, "overrides": overrides}


def t2i_equivalence_overrides(world: dict, shard_dir: Path) -> dict:
    """A 2-step run on 4 shards of 4 samples without shuffling: 2 ranks x 4 and 1 process x 2
    micro-batches of 4 then see the same micro-batches; eps=1e-3 keeps float noise in near-zero
    gradients from flipping Adam's first ~sign(g) step. lr 1e-2: the DiT starts with a zero output layer
    (PixArt's init), so step 1 moves only that layer and step 2 must be large enough to move most others."""
    pattern, _ = make_shards(shard_dir, n_shards=4, per_shard=4)
    common = {**world["overrides"], "train_shards": pattern, "dataset_size": 16, "max_steps": 2}
    common.update(checkpoint_every=2, shuffle_buffer=0, p=0.5, lr=1e-2, eps=1e-3, eval_prompts=2, grid_prompts=1)
    return common


def assert_same_t2i_training(one: Path, two: Path) -> None:
    """Run folder ``two`` (2 ranks) trained what ``one`` (1 process, 2 micro-batches) did."""
    import torch

    from training.checkpoint import load_checkpoint

    single, ddp = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert (single["world_size"], ddp["world_size"], single["steps"], ddp["steps"]) == (1, 2, 2, 2)
    assert sum(ddp["mixing"]["used"].values()) == 16  # both ranks' samples are counted, each once
    assert ddp["mixing"] == single["mixing"] and 0 < ddp["mixing"]["used"]["altogether"] < 16
    assert set(ddp["clip_score"]) == {"original", "synthetic"}  # rank 0 evaluated
    a, b = (load_checkpoint(run / "checkpoints" / "step_00000002.pt") for run in (one, two))
    moved = 0
    for name, wa in a["state_dict"].items():
        wb = b["state_dict"][name]
        assert torch.allclose(wa, wb, atol=1e-6, rtol=1e-4), (name, (wa - wb).abs().max().item())
        assert torch.allclose(a["ema"][name], b["ema"][name], atol=1e-6, rtol=1e-4), name
        # EMA at decay 0.9999 still sits at the initial weights: the difference is what 2 steps moved.
        moved += int((wa - a["ema"][name]).abs().max() > 1e-4)
    assert moved > len(a["state_dict"]) // 2  # the two steps changed most tensors (a wrong step is ~2e-3)
