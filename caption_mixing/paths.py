"""Checks for user-given names and folders before anything touches the file system.

A task, caption-source or run name typed on a command line often becomes a path component
(``tasks/<name>.json``, ``<shard>.<source>.json``, ``runs/<label>/``). ``validate_name`` refuses
anything that could leave the folder it is meant for, so a bad name fails before the first write.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
MAX_NAME_LEN = 128


def validate_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as one path component; else raise naming ``what`` (e.g. "--name")."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LEN or ".." in name:
        raise ValueError(
            f"{what}: {name!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            f"(not starting with '.' or containing '..', at most {MAX_NAME_LEN} characters)"
        )
    return name


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path if it is a folder or does not exist yet; an existing file is an error naming ``flag``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {p} exists and is not a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag}: {parent} (in {p}) is a file, not a folder")
            break
    return p
