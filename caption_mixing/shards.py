"""Shards: brace patterns like ``data/{00000..01242}.tar`` (several joined with ``::``), and reading them.

``iter_tar_samples`` is the one reader of shard contents, used by training and by ``attach``. It
groups members into samples by WebDataset's rule (key = path up to the first dot of the base name)
and, unlike a plain ``tarfile`` loop, notices a shard that ends early: ``tarfile`` treats data
that stops at a header boundary (or garbage after the first member) as a normal end of archive.
A shard that cannot be read to its end raises ``ShardReadError`` after the complete samples before
the damage; the sample being read when the data ended is dropped (it may lack members), never
yielded.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Collection, Iterator
from typing import BinaryIO

import braceexpand

TRUNCATED_TAR = "truncated_tar"
UNREADABLE_TAR = "unreadable_tar"


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_shards(pattern: str | list[str], check_exists: bool = True) -> list[str]:
    """Expand brace patterns into a shard list; an error names a pattern that matches no file."""
    patterns = pattern if isinstance(pattern, list) else str(pattern).split("::")
    urls: list[str] = []
    for pat in patterns:
        pat = pat.strip()
        if not pat:
            continue
        expanded = list(braceexpand.braceexpand(pat))
        if check_exists and not _is_remote(pat):
            present = [u for u in expanded if os.path.exists(u.removeprefix("file://"))]
            if not present:
                raise FileNotFoundError(f"shard pattern {pat!r} matches no file")
            missing = len(expanded) - len(present)
            if missing:
                raise FileNotFoundError(
                    f"shard pattern {pat!r}: {missing} of {len(expanded)} shards do not exist "
                    f"(first missing: {next(u for u in expanded if u not in present)})"
                )
        urls.extend(expanded)
    if not urls:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    return urls


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first dot of the basename, extension = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class ShardReadError(ValueError):
    """A shard that could not be read to its end; ``kind`` is ``truncated_tar`` or ``unreadable_tar``."""

    def __init__(self, shard: str, kind: str, offset: int, key: str | None, samples: int, reason: str) -> None:
        self.shard, self.kind, self.offset, self.key, self.samples, self.reason = (
            shard,
            kind,
            offset,
            key,
            samples,
            reason,
        )
        what = "truncated" if kind == TRUNCATED_TAR else "unreadable"
        cut = f"the sample being read, {key!r}, is dropped" if key is not None else "no sample was being read"
        super().__init__(
            f"shard {shard} is {what} at byte {offset} ({reason}); {cut}; {samples} complete samples before it"
        )

    def as_dict(self) -> dict:
        return {"shard": self.shard, "kind": self.kind, "offset": self.offset, "key": self.key, "samples": self.samples}


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the TarFile why reading headers stopped: ``tarfile`` ends silently on a short
    or invalid header after the first member, which is how a truncated shard looks."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a block of zeros: the archive's real end
            raise
        except tarfile.HeaderError as e:
            tar.end_problem = e  # type: ignore[attr-defined]
            raise


def _kind(exn: BaseException) -> str:
    truncated = (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, EOFError)  # type: ignore[attr-defined]
    if isinstance(exn, truncated) or "unexpected end of data" in str(exn):
        return TRUNCATED_TAR
    return UNREADABLE_TAR


def iter_tar_samples(fileobj: BinaryIO, shard: str, want: Collection[str] | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes, ...}`` of an open tar stream, in order.

    ``want`` limits which extensions' bytes are kept (every key is still yielded). Members whose
    name has no extension or starts with ``__`` are skipped, extensions are lower-cased. Raises
    ``ShardReadError`` (after the complete samples) when the shard is damaged.
    """
    tar: tarfile.TarFile | None = None
    current: dict | None = None
    done = 0
    where = 0  # header offset of the member being read: a cut in its data is reported there
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndCheckingTarInfo)
        for info in tar:
            where = info.offset
            if not info.isreg():
                continue
            key, ext = split_member(info.name)
            ext = ext.lower()
            if not ext or key.startswith("__"):  # not a sample member (WebDataset skips these too)
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                    done += 1
                current = {"__key__": key, "__url__": shard}
            if ext not in current and (want is None or ext in want):
                current[ext] = tar.extractfile(info).read()
            tar.members = []  # tarfile keeps every header otherwise
        problem = getattr(tar, "end_problem", None)
        if problem is not None:  # the data stops where a header should be
            where = tar.offset
            raise problem
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        key = None if current is None else current["__key__"]
        raise ShardReadError(shard, _kind(e), where, key, done, str(e) or type(e).__name__) from None
    if current is not None:
        yield current


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard: a local path, ``file://``, or anything WebDataset's ``gopen`` opens."""
    if not _is_remote(url) and not url.startswith("pipe:"):
        return open(url.removeprefix("file://"), "rb")  # noqa: SIM115 (the caller closes it)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_tar_samples(url: str, want: Collection[str] | None = None) -> Iterator[dict]:
    """``iter_tar_samples`` of the shard at ``url``; a shard that cannot be opened is a ``ShardReadError``."""
    try:
        stream = open_shard(url)
    except OSError as e:
        raise ShardReadError(url, UNREADABLE_TAR, 0, None, 0, f"cannot open: {e}") from None
    with stream:
        yield from iter_tar_samples(stream, url, want)
