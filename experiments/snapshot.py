"""Freeze the code a sweep was submitted with, so a job requeued days later runs that code.

A Slurm or local job imports its code where the sweep says, not from the live checkout: the
sweep copies the project's files into ``<out>/.code/<commit>-<digest>/`` and the job script puts
it first on ``PYTHONPATH``, sets ``PYTHONSAFEPATH`` (Python >= 3.11: no process of the job, e.g.
the ``python -m clip_train`` t2i starts, puts its working folder first on ``sys.path``) and
starts in it (``CodeSnapshot.job_setup``); the job then works in the sweep's folder, where
relative paths in its config mean what they meant to the sweep. In a git checkout
the copy holds the tracked files plus untracked files git does not ignore (new modules not yet
committed; large untracked files are left out and listed), like submitit's ``RsyncSnapshot`` but
without needing rsync. Outside git (an installed wheel) it copies the project's packages. The
digest is over the copied files, so two sweeps of the same code share a snapshot. The commit and
whether the tree had uncommitted changes are recorded in sweep.json and every run's state.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from caption_mixing.atomic import atomic_write_json

PACKAGES = ("caption_mixing", "clip_train", "eval", "experiments", "t2i", "testbed", "training")
MAX_UNTRACKED_BYTES = 1 << 20  # an untracked file bigger than this is data, not code
SNAPSHOTS = ".code"
INFO = "SNAPSHOT.json"


@dataclass(frozen=True)
class CodeSnapshot:
    """Where a job's code lives and which commit it is (``dirty``: uncommitted changes; None outside git)."""

    commit: str | None
    dirty: bool | None
    dir: str

    def record(self) -> dict[str, Any]:
        """What state.json and sweep.json keep about the code (under the key ``code``)."""
        return asdict(self)

    def job_setup(self) -> list[str]:
        """Shell lines run before the job's Python starts: import from the snapshot, start in it."""
        quoted = shlex.quote(self.dir)
        return [f'export PYTHONPATH={quoted}"${{PYTHONPATH:+:$PYTHONPATH}}"', "export PYTHONSAFEPATH=1", f"cd {quoted}"]


def source_root() -> Path:
    """The folder holding the project's packages this process imported (a checkout or site-packages)."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git -C root ARGS``, or None when git is missing or fails (not a checkout)."""
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_checkout(root: Path) -> bool:
    """Whether ``root`` is the top folder of a git work tree."""
    top = _git(root, "rev-parse", "--show-toplevel")
    return top is not None and Path(top.strip()).resolve() == root.resolve()


def describe(root: Path | None = None) -> CodeSnapshot:
    """The running code as it is (no copy): its commit and dirty flag, ``dir`` = the live folder."""
    root = root or source_root()
    if not git_checkout(root):
        return CodeSnapshot(commit=None, dirty=None, dir=str(root))
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    status = _git(root, "status", "--porcelain")
    return CodeSnapshot(commit=commit, dirty=bool(status and status.strip()), dir=str(root))


def _git_files(root: Path, exclude: Path | None) -> tuple[list[str], list[str]]:
    """(files to copy, large untracked files left out), paths relative to ``root``."""
    tracked = set(filter(None, (_git(root, "ls-files", "-z", "--cached") or "").split("\0")))
    untracked = set(filter(None, (_git(root, "ls-files", "-z", "--others", "--exclude-standard") or "").split("\0")))
    files, skipped = [], []
    for rel in sorted(tracked) + sorted(untracked - tracked):
        path = root / rel
        if not path.is_file() or (exclude is not None and path.resolve().is_relative_to(exclude)):
            continue  # deleted in the work tree, or inside the sweep's own output folder
        if rel not in tracked and (SNAPSHOTS in path.parts or ".submitit" in path.parts):
            continue  # another sweep's snapshots and job files inside the checkout
        if rel not in tracked and path.stat().st_size > MAX_UNTRACKED_BYTES:
            skipped.append(rel)
            continue
        files.append(rel)
    return files, skipped


def _package_files(root: Path) -> list[str]:
    """Every file of the project's packages under ``root`` (an install without git)."""
    files = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(str(path.relative_to(root)))
    return files


def _digest(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def take(out: Path, root: Path | None = None) -> CodeSnapshot:
    """Copy the code into ``out/.code/<commit>-<digest>/`` (kept if it is already there) and describe it."""
    root = (root or source_root()).resolve()
    out = Path(out).resolve()
    live = describe(root)
    files, skipped = _git_files(root, out) if live.commit else (_package_files(root), [])
    name = f"{(live.commit or 'nogit')[:12]}-{_digest(root, files)}"
    target = out / SNAPSHOTS / name
    snap = CodeSnapshot(commit=live.commit, dirty=live.dirty, dir=str(target))
    if (target / INFO).exists():
        return snap
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
        info = {**snap.record(), "source": str(root), "files": len(files), "left_out": skipped}
        atomic_write_json(tmp / INFO, info)
        try:
            os.rename(tmp, target)
        except OSError:  # another sweep made the same snapshot meanwhile
            if not (target / INFO).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return snap


def read_info(snapshot_dir: Path) -> dict[str, Any]:
    """The SNAPSHOT.json of a snapshot folder."""
    return json.loads((Path(snapshot_dir) / INFO).read_text())
