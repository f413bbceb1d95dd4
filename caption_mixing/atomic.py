"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never a
half-written file, even when the writer is killed mid-write. A kill between the temp file's
creation and the rename leaves ``.{name}.<random suffix>.tmp`` behind: readers never look at such names,
and ``remove_stale_temps`` clears them for the files a tool is about to write again.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

# mkstemp(prefix=".{name}.", suffix=".tmp") adds 8 characters from [a-z0-9_].
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(filename: str) -> str | None:
    """The file name an ``atomic_write`` temp file was for, or None if ``filename`` is not one."""
    m = _TEMP_NAME.match(filename)
    return m.group("target") if m else None


def remove_stale_temps(folder: str | os.PathLike, targets: set[str]) -> list[Path]:
    """Delete temp files left by killed ``atomic_write`` calls for the file names in ``targets``.

    Only call this for files that no other live process is writing (e.g. a tool's own outputs).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if temp_target(path.name) in targets:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None throughout a nested document: JSON has no NaN, and a reader's parser may reject it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Strict JSON (non-finite floats become null), written atomically."""
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def build_folder_once(root: Path, done: str, build: Callable[[Path], None]) -> bool:
    """Make ``root`` a complete folder, marked complete by its file ``done``; False if it already was.

    ``build(tmp)`` fills a private sibling folder, which is renamed into place only once ``done`` is in
    it: an interrupted or concurrent build never leaves a half-written ``root`` for a reader (a sweep
    point) to pick up. When two processes race, the first rename wins and the other's build is dropped.
    """
    import shutil

    root = Path(root)
    if (root / done).exists():
        return False
    tmp = root.with_name(f".{root.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if not (tmp / done).exists():
            raise RuntimeError(f"building {root}: the build wrote no {done}")
        if (root / done).exists():  # another process finished first: use its build
            return False
        shutil.rmtree(root, ignore_errors=True)  # an incomplete folder (older versions built in place)
        try:
            os.rename(tmp, root)
        except OSError:  # lost a race with another process
            if not (root / done).exists():
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
