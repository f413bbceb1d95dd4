"""The run folder: the unit of reproducibility and idempotency for one sweep point.

It holds ``config.json`` (the resolved config and its hash), ``provenance.json`` (seed, package
versions, git commit), checkpoints, the training log and ``metrics.json``. A folder whose metrics
exist for the same config is reused; one made by a different config is refused unless forced.
"""

from __future__ import annotations

import json
from pathlib import Path

from caption_mixing.paths import validate_name
from caption_mixing.provenance import config_hash, write_run_metadata

__all__ = ["RunConflictError", "TESTBED_NOTICE", "check_run_dir", "run_dir_for", "seed_label", "write_run_metadata"]

TESTBED_NOTICE = "Embedded synthetic testbed: numbers exercise the suite and are not paper results."
NEW, RESUME, DONE = "new", "resume", "done"


class RunConflictError(RuntimeError):
    """The run folder was written by a different config."""


def run_dir_for(out: Path, task: str, preset: str | None, p: float, label: str | None = None) -> Path:
    """``OUT/<task>-<preset>-p<p>[-<label>]``; the label (seed, mode) is part of a folder name, so it is validated."""
    name = f"{task}-{Path(preset or 'custom').stem}-p{p:g}"
    if label:
        name += f"-{validate_name(label, 'run label')}"
    return Path(out) / validate_name(name, "run folder name")


def seed_label(seed: int) -> str | None:
    """The run-folder label of a training seed: None for seed 0, ``s<seed>`` otherwise.

    The folder name is a function of the config's seed, so one name never stands for two seeds:
    ``clip-embedded-p0.15`` is seed 0 (the presets' seed, hence the names of runs made before seeds
    became a sweep axis) and ``clip-embedded-p0.15-s1`` is seed 1. A folder written under the old
    name with another seed is refused, since the seed is part of the config hash.
    """
    return f"s{seed}" if seed else None


def check_run_dir(run_dir: Path, config: dict, force: bool) -> str:
    """'new', 'resume' or 'done'; a folder written by a different config is refused unless forced."""
    cfg_file = Path(run_dir) / "config.json"
    if not cfg_file.exists():
        return NEW
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exn:
        raise RunConflictError(f"{cfg_file} is not valid JSON ({exn}); use another --out or --force") from exn
    want = config_hash(config)
    if saved.get("config_hash") != want and not force:
        raise RunConflictError(
            f"{run_dir} was made by a different config (hash {saved.get('config_hash')} vs {want}); "
            "use another --out or --force"
        )
    return DONE if (Path(run_dir) / "metrics.json").exists() and not force else RESUME
