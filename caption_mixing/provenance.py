"""What a run needs written next to its results to be reproduced: config, seed, versions, commit."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from caption_mixing.atomic import atomic_write_json

PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "webdataset",
    "clip-benchmark",
    "diffusers",
    "accelerate",
    "torchmetrics",
    "submitit",
    "numpy",
    "pillow",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(repo: Path | None = None) -> dict[str, str | bool | None]:
    """Commit of the code that ran, and whether the tree had uncommitted changes."""
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def config_hash(config: dict) -> str:
    """Short stable hash of a resolved config (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def provenance(seed: int) -> dict:
    return {
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "git": git_state(),
        "packages": package_versions(),
    }


def write_run_metadata(run_dir: str | os.PathLike, config: dict, seed: int) -> None:
    """Write ``config.json`` (resolved config + its hash) and ``provenance.json`` into the run folder."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "config.json", {"config_hash": config_hash(config), **config})
    atomic_write_json(run_dir / "provenance.json", provenance(seed))
