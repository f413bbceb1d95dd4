"""The sweep's on-disk record: each run folder's ``state.json`` and the sweep folder's ``sweep.json``.

``state.json`` says where a point stands (pending/submitted/running/requeued/finished/failed), under
which launcher and job id, how often it was requeued and which code snapshot it runs. It is written
by the sweep and by the job (possibly on several hosts), so every update is a locked
read-modify-write with an atomic replace. ``sweep.json`` lists the sweep's points; ``status`` and
the final report read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from caption_mixing.atomic import atomic_write_json

ACTIVE = ("submitted", "running", "requeued")
STATES = ("pending", *ACTIVE, "finished", "failed")


def now_iso() -> str:
    """UTC timestamp with seconds, for state files."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing): one writer at a time across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run folder's state.json, or {} when there is none."""
    try:
        return json.loads((Path(run_dir) / "state.json").read_text())
    except FileNotFoundError:
        return {}


def update_state(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into state.json (locked read-modify-write, atomic replace)."""
    run_dir = Path(run_dir)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown run state {fields['state']!r}")
    with locked(run_dir / ".state.lock"):
        state = read_state(run_dir)
        state.update(fields, updated_at=now_iso())
        atomic_write_json(run_dir / "state.json", state)
    return state


def read_manifest(out: Path) -> dict[str, Any]:
    """The sweep folder's sweep.json; FileNotFoundError names the folder and the flag."""
    path = Path(out) / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(f"--out: {out} holds no sweep.json (not a sweep folder, or nothing was launched yet)")
    return json.loads(path.read_text())


def write_manifest(
    out: Path, task: str, preset: str, overrides: dict[str, Any], points: list[dict], **extra: Any
) -> None:
    """sweep.json: what this sweep is (task, preset, overrides, points), so jobs and ``status`` know all of it.

    ``points`` are ``{"p", "run_dir" (name in ``out``), "config_hash"}``; ``extra`` adds e.g. the
    launcher and the code snapshot.
    """
    atomic_write_json(
        Path(out) / "sweep.json",
        {"task": task, "preset": preset, "overrides": overrides, "points": points, "written_at": now_iso(), **extra},
    )
