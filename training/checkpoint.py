"""open_clip-format checkpoints, written atomically, with the state a resumed run needs.

open_clip reads ``state_dict``; the other keys (optimizer, step, epoch, data position, mixing
counts, config) are ours and only hold tensors and plain Python values, so every checkpoint
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from caption_mixing.atomic import atomic_write

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (temp files never match), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], step: int, keep_last: int) -> Path:
    """Write ``step_XXXXXXXX.pt`` atomically, then delete all but the last ``keep_last``."""
    path = atomic_write(checkpoint_path(ckpt_dir, step), lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; an unreadable file raises ``CheckpointError`` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as exn:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exn).__name__}: {exn})") from exn


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, not a torch file, foreign pickle)."""


def load_latest(ckpt_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that loads, with its state; unreadable newer ones are named and skipped.

    A node that died during a copy, or a disk that filled up, can leave a truncated ``step_*.pt``
    despite the atomic rename (e.g. a file copied in by hand); resuming from the previous good one
    loses a checkpoint interval instead of the run.
    """
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exn:
            log.warning("%s; trying an older checkpoint", exn)
            continue
        return path, state
    return None, None


def load_model_state(model: torch.nn.Module, state: dict[str, Any], model_name: str, path: Path) -> None:
    """Load weights; a checkpoint of another architecture gets an error naming both, not a shape dump."""
    saved_name = state.get("model_name")
    if saved_name is not None and saved_name != model_name:
        raise ValueError(f"checkpoint {path} is for model {saved_name!r}, but this run builds {model_name!r}")
    sd = state["state_dict"]
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    if bad or missing:
        raise ValueError(
            f"checkpoint {path} does not fit model {model_name!r}: "
            f"{len(bad)} tensors differ in shape (e.g. {bad[:2]}), {len(missing)} missing (e.g. {missing[:2]})"
        )
    model.load_state_dict(sd)
