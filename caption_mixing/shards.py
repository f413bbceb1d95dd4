"""Shards: brace patterns like ``data/{00000..01242}.tar`` (several joined with ``::``), and reading them.

``iter_tar_samples`` is the one reader of shard contents, used by training and by ``attach``. It
groups members into samples by WebDataset's rule (key = path up to the first dot of the base name)
and, unlike a plain ``tarfile`` loop, notices a shard that ends early: ``tarfile`` treats data
that stops at a header boundary (or garbage after the first member) as a normal end of archive.
A shard that cannot be read to its end raises ``ShardReadError`` after the complete samples before
the damage; the sample being read when the data ended is dropped (it may lack members), never
yielded.

Shards may be local paths, ``file://`` URLs, webdataset ``pipe:`` commands (``pipe:aws s3 cp
s3://b/00000.tar -``) or fsspec URLs (``s3://``, ``gs://``, ``memory://``). ``scan_shard`` is
``attach``'s faster reader of a whole shard: it parses tar headers itself and seeks past members
it does not need in local files; remote shards are read as a stream (nothing is seeked, nothing
held but the members asked for). Archives it does not parse (compressed, pax or GNU long-name
headers) go through ``iter_tar_samples``, with the same results and the same damage reports.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tarfile
import zlib
from collections.abc import Collection, Iterator
from typing import BinaryIO

import braceexpand

TRUNCATED_TAR = "truncated_tar"
UNREADABLE_TAR = "unreadable_tar"


SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _is_remote(url: str) -> bool:
    """Not a local path: a ``pipe:`` command or a URL other than ``file://``."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def shard_location(url: str) -> str | None:
    """The shard file a URL names: the path or URL itself, or for ``pipe:`` the last word of the
    command that names a tar (``pipe:aws s3 cp s3://b/00001.tar -`` -> ``s3://b/00001.tar``); None
    when a ``pipe:`` command names none (its sidecars then need a ``sidecar_dir``)."""
    if not url.startswith("pipe:"):
        return url
    try:
        words = shlex.split(url[5:])
    except ValueError:
        words = url[5:].split()
    named = [w for w in words if w.endswith(SHARD_SUFFIXES)]
    return named[-1] if named else None


def expand_shards(pattern: str | list[str], check_exists: bool = True) -> list[str]:
    """Expand brace patterns into a shard list; an error names a pattern that matches no file."""
    patterns = pattern if isinstance(pattern, list) else str(pattern).split("::")
    urls: list[str] = []
    for pat in patterns:
        pat = pat.strip()
        if not pat:
            continue
        expanded = list(braceexpand.braceexpand(pat))
        if check_exists and not _is_remote(pat):  # pipe: and remote shards are not listed (each list is a request)
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
    """A binary stream of a shard: a local path or ``file://``, a ``pipe:`` or ``http(s)://`` URL
    (WebDataset's ``gopen``), or any other URL through fsspec (read in blocks, never whole)."""
    if not _is_remote(url):
        return open(url.removeprefix("file://"), "rb")  # noqa: SIM115 (the caller closes it)
    if url.startswith(("pipe:", "http://", "https://")):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    from caption_mixing.storage import open_read

    return open_read(url)


def _open_or_raise(url: str) -> BinaryIO:
    try:
        return open_shard(url)
    except (OSError, ValueError) as e:
        raise ShardReadError(url, UNREADABLE_TAR, 0, None, 0, f"cannot open: {e}") from None


def _close(stream: BinaryIO, url: str, done: int) -> None:
    """Close a shard stream; a ``pipe:`` command that failed says so on close."""
    try:
        stream.close()
    except OSError as e:
        raise ShardReadError(url, UNREADABLE_TAR, 0, None, done, f"command failed: {e}") from None


def read_tar_samples(url: str, want: Collection[str] | None = None) -> Iterator[dict]:
    """``iter_tar_samples`` of the shard at ``url``; a shard that cannot be opened is a ``ShardReadError``."""
    stream = _open_or_raise(url)
    done = 0
    try:
        for sample in iter_tar_samples(stream, url, want):
            done += 1
            yield sample
    except BaseException:
        try:
            stream.close()
        except OSError:
            pass
        raise
    _close(stream, url, done)


# ---------------------------------------------------------------------------------------------
# attach's reader: whole shards, headers parsed here, unneeded data skipped
# ---------------------------------------------------------------------------------------------

BLOCK = 512
CHUNK = 1 << 20


class _Unsupported(Exception):
    """The shard needs ``tarfile`` (compressed, or headers this reader does not parse)."""


_REGULAR_TYPES = (48, 0, 55)  # "0", NUL, "7": a regular member
_TARFILE_TYPES = (120, 103, 76, 75, 83)  # "x", "g" pax; "L", "K" GNU long names; "S" sparse: tarfile reads these


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _member_header(block: bytes) -> tuple[int, int, str, str] | None:
    """(data size, type, sample key, lower-case extension) of a header block; None for a bad checksum.

    The checksum (the sum of the header's bytes, its own field as spaces) is checked through
    Adler-32, whose low half is 1 + that sum mod 65521: zlib sums in C, ``sum`` in Python does not.
    """
    field = block[148:156]
    try:
        stored = int(field.split(b"\0", 1)[0].strip(), 8)
        if (stored + sum(field) - 255 - (zlib.adler32(block) & 0xFFFF)) % 65521:
            return None
        size = _octal(block[124:136])
    except ValueError:
        return None
    kind = block[156]
    if kind in _TARFILE_TYPES:
        raise _Unsupported(f"header type {chr(kind)!r}")
    name = block[:100].split(b"\0", 1)[0]
    if block[345] and block[257:265] == b"ustar\x0000":
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    key, ext = split_member(name.decode("utf-8", "surrogateescape"))
    return size, kind, key, ext.lower()


def _scan(stream: BinaryIO, total: int | None, url: str, want: Collection[str], hashed: Collection[str]) -> list[dict]:
    """The samples of a plain tar, in order; ``ShardReadError`` carries the complete ones on damage.

    ``total`` is the file size of a local (seekable) shard: data not wanted is seeked past; a stream
    (``total`` None) is read past.
    """
    out: list[dict] = []
    current: dict | None = None
    buf, pos, base = b"", 0, 0  # base: the shard offset of buf[0]
    read = stream.read

    def fill(n: int) -> None:
        """Make ``buf[pos:]`` hold ``n`` bytes, or all that is left."""
        nonlocal buf, pos, base
        parts, have = [buf[pos:]], len(buf) - pos
        while have < n:
            chunk = read(max(CHUNK, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        buf, base, pos = b"".join(parts), base + pos, 0

    def jump(n: int) -> bool:
        """Move ``n`` bytes on, past the buffer; False when the data ends first."""
        nonlocal buf, pos, base
        rest, base, buf, pos = n - (len(buf) - pos), base + len(buf), b"", 0
        if total is not None:
            if base + rest > total:
                base = total
                return False
            stream.seek(base + rest)
            base += rest
            return True
        while rest > 0:
            got = len(read(min(rest, CHUNK)))
            if not got:
                return False
            rest, base = rest - got, base + got
        return True

    def fail(kind: str, where: int, reason: str) -> ShardReadError:
        key = None if current is None else current["__key__"]
        err = ShardReadError(url, kind, where, key, len(out), reason)
        err.samples_read = out  # type: ignore[attr-defined]
        return err

    while True:
        if len(buf) - pos < BLOCK:
            fill(BLOCK)
        where, block = base + pos, buf[pos : pos + BLOCK]
        if where == 0 and (block[:2] == b"\x1f\x8b" or block[:3] in (b"BZh", b"\xfd7z")):
            raise _Unsupported("compressed")
        if len(block) < BLOCK:
            if where == 0:
                raise fail(UNREADABLE_TAR, 0, "empty file" if not block else "shorter than one tar header")
            raise fail(TRUNCATED_TAR, where, "the data ends where a member header should be")
        if block.count(0) == BLOCK:
            if where == 0:
                raise fail(UNREADABLE_TAR, 0, "empty file")
            break  # end-of-archive marker
        header = _member_header(block)
        if header is None:
            raise fail(UNREADABLE_TAR, where, "bad checksum: not a tar header")
        size, kind, key, ext = header
        pos += BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in _REGULAR_TYPES and ext and not key.startswith("__"):
            if current is None or key != current["__key__"]:
                if current is not None:
                    out.append(current)
                current = {"__key__": key, "__url__": url}
            keep = ext in want and ext not in current
            digest = ext in hashed and "__sha256__" not in current
            if keep or digest:
                if len(buf) - pos < size:
                    fill(size)
                data = buf[pos : pos + size]
                if len(data) < size:
                    raise fail(TRUNCATED_TAR, where, "unexpected end of data")
                if keep:
                    current[ext] = data
                if digest:
                    current["__sha256__"] = hashlib.sha256(data).hexdigest()
        if len(buf) - pos >= padded:
            pos += padded
        elif not jump(padded):
            raise fail(TRUNCATED_TAR, where, "unexpected end of data")
    if current is not None:
        out.append(current)
    return out


def _scan_with_tarfile(url: str, want: Collection[str], hashed: Collection[str]) -> list[dict]:
    out: list[dict] = []
    try:
        for sample in read_tar_samples(url, set(want) | set(hashed)):
            for ext in hashed:
                if ext in sample and "__sha256__" not in sample:
                    sample["__sha256__"] = hashlib.sha256(sample[ext]).hexdigest()
            for ext in set(hashed) - set(want):
                sample.pop(ext, None)
            out.append(sample)
    except ShardReadError as e:
        e.samples_read = out  # type: ignore[attr-defined]
        raise
    return out


def scan_shard(url: str, want: Collection[str] = (), hashed: Collection[str] = ()) -> list[dict]:
    """Every sample of a shard as ``{"__key__", "__url__", ext: bytes for ext in want}``, plus
    ``"__sha256__"``: the SHA-256 of its first member whose extension is in ``hashed``.

    A damaged shard raises ``ShardReadError`` with the complete samples before the damage in its
    ``samples_read`` attribute, as ``iter_tar_samples`` reports them.
    """
    want, hashed = {w.lower() for w in want}, {h.lower() for h in hashed}
    stream = _open_or_raise(url)
    try:
        total = os.fstat(stream.fileno()).st_size if not _is_remote(url) else None
        samples = _scan(stream, total, url, want, hashed)
    except _Unsupported:
        stream.close()
        return _scan_with_tarfile(url, want, hashed)
    except BaseException:
        try:
            stream.close()
        except OSError:
            pass
        raise
    _close(stream, url, len(samples))
    return samples
