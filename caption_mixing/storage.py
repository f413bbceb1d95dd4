"""Where shards and sidecars live: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``memory://``).

CC-12M-sized corpora usually sit in object storage, so ``attach``, ``stats`` and training take
shard URLs and sidecar folders there as well as local paths. A *location* is a ``Path`` for a local
file (``file://`` URLs are local too) and a ``str`` URL otherwise; the helpers here do the few file
operations the tools need on either. Local writes are atomic (``caption_mixing.atomic``); an object
store's put is atomic per object, which is what a reader needs there.

Remote schemes need fsspec's driver for them (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``); a
missing driver is an error saying which package to install.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, BinaryIO

from caption_mixing.atomic import atomic_write_bytes

Location = Path | str


def is_url(text: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those are local paths)."""
    s = str(text)
    return "://" in s and not s.startswith("file://")


def location(text: str | os.PathLike) -> Location:
    """A local ``Path`` (``file://`` stripped) or the remote URL unchanged."""
    if isinstance(text, Path):
        return text
    s = str(text)
    if is_url(s):
        return s
    return Path(s.removeprefix("file://"))


def join(folder: Location, name: str) -> Location:
    folder = location(folder)
    return folder / name if isinstance(folder, Path) else f"{folder.rstrip('/')}/{name}"


def parent(loc: Location) -> Location:
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.parent
    scheme, _, rest = loc.partition("://")
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def basename(loc: Location) -> str:
    loc = location(loc)
    return loc.name if isinstance(loc, Path) else posixpath.basename(loc.rstrip("/"))


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it); a missing driver names the package to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.partition("://")[0]
        raise OSError(f"cannot open {url}: fsspec has no driver for {scheme}:// here ({e})") from None


def exists(loc: Location) -> bool:
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.exists()
    fs, path = _fs(loc)
    return fs.exists(path)


def open_read(loc: Location) -> BinaryIO:
    """A binary stream (the caller closes it). Remote files are read in blocks, never whole."""
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.open("rb")
    fs, path = _fs(loc)
    return fs.open(path, "rb")


def read_bytes(loc: Location) -> bytes:
    with open_read(loc) as f:
        return f.read()


def write_bytes(loc: Location, data: bytes) -> Location:
    """Write a whole file: atomically (temp + rename) locally, one put remotely."""
    loc = location(loc)
    if isinstance(loc, Path):
        return atomic_write_bytes(loc, data)
    fs, path = _fs(loc)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    return loc


def replace(src: Location, dst: Location) -> None:
    """Rename ``src`` over ``dst`` (an object store copies then deletes: each object stays whole)."""
    src, dst = location(src), location(dst)
    if isinstance(src, Path) and isinstance(dst, Path):
        os.replace(src, dst)
        return
    fs, a = _fs(str(src))
    _, b = _fs(str(dst))
    fs.mv(a, b)


def unlink(loc: Location) -> None:
    """Delete a file if it exists."""
    loc = location(loc)
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
        return
    fs, path = _fs(loc)
    if fs.exists(path):
        fs.rm(path)


def makedirs(loc: Location) -> None:
    loc = location(loc)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)
        return
    fs, path = _fs(loc)
    fs.makedirs(path, exist_ok=True)


def glob(folder: Location, pattern: str) -> list[Location]:
    """Files in ``folder`` whose name matches ``pattern`` (shell style), sorted."""
    folder = location(folder)
    if isinstance(folder, Path):
        return sorted(folder.glob(pattern)) if folder.is_dir() else []
    fs, path = _fs(folder)
    return sorted(join(folder, posixpath.basename(p)) for p in fs.glob(f"{path.rstrip('/')}/{pattern}"))
