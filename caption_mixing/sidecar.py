"""Per-shard synthetic-caption sidecars.

A sidecar holds one caption source (e.g. ``altogether``) for one WebDataset shard, as a JSON
object ``{"format", "shard", "source", "captions": {sample_key: caption}}``. It lives next to
the shard as ``{shard_stem}.{source}.json`` (or in a separate folder with the same name), so
captions are joined to samples one shard at a time: memory is bounded by the shard, not the
corpus, and source shards are never modified. A source name becomes part of a file name, so it
must be a plain name (``paths.validate_name``): ``x/../../y`` is refused before any file is touched.

Format 2 (written only when needed, so plain sidecars stay readable by older readers) adds:

- **variants**: a caption may be a list of strings (LaCLIP's 4 rewrites of an alt-text,
  DataCompDR's 5 captions); the mixing layer draws one of them per visit
  (``caption_mixing.mixing.pick_variant``).
- **fields**: numeric metadata that came with the captions, ``{"fields": {"re_clip_score":
  {sample_key: 0.31, ...}}}``, read with ``read_sidecar_fields``.

Shards and sidecar folders may be remote (``caption_mixing.storage``): a sidecar of
``s3://b/cc12m/00001.tar`` is ``s3://b/cc12m/00001.{source}.json`` unless a ``sidecar_dir`` is
given; a ``pipe:`` shard's sidecar sits beside the file its command names.
"""

from __future__ import annotations

import json
import os

from caption_mixing import storage
from caption_mixing.paths import validate_name
from caption_mixing.shards import SHARD_SUFFIXES, shard_location

SIDECAR_FORMAT = "caption_mixing.sidecar/1"
SIDECAR_FORMAT_2 = "caption_mixing.sidecar/2"  # variants (lists) and/or numeric fields
FORMATS = (SIDECAR_FORMAT, SIDECAR_FORMAT_2)

Caption = str | list[str]


class SidecarError(ValueError):
    """A sidecar file that is malformed or belongs to a different shard."""


def _named(shard: str | os.PathLike) -> str:
    text = str(shard)
    where = shard_location(text)
    if where is None:
        raise ValueError(
            f"shard {text!r}: the pipe: command names no .tar file, so its sidecars need a sidecar_dir (--sidecar-dir)"
        )
    return where


def shard_name(shard: str | os.PathLike) -> str:
    """``data/00012.tar`` -> ``00012.tar``; for ``pipe:`` URLs, the file the command reads."""
    return os.path.basename(_named(shard).rstrip("/"))


def shard_stem(shard: str | os.PathLike) -> str:
    """``data/00012.tar`` -> ``00012`` (also for ``.tar.gz``, URLs and ``pipe:`` commands)."""
    name = shard_name(shard)
    for ext in SHARD_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def sidecar_path(
    shard: str | os.PathLike, source: str, sidecar_dir: str | os.PathLike | None = None
) -> storage.Location:
    """Where the sidecar of caption source ``source`` for ``shard`` lives (``source`` must be a plain name).

    A ``Path`` for local files, a URL string for remote ones (``caption_mixing.storage``).
    """
    validate_name(source, "caption source")
    folder = storage.location(sidecar_dir) if sidecar_dir is not None else storage.parent(_named(shard))
    return storage.join(folder, f"{shard_stem(shard)}.{source}.json")


def _clean(caption: object) -> Caption | None:
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
        return list(caption)
    return None


def sidecar_document(
    shard: str | os.PathLike,
    source: str,
    captions: dict[str, Caption],
    fields: dict[str, dict[str, float]] | None = None,
) -> dict:
    """The JSON document of a sidecar (format 1 unless variants or fields need format 2)."""
    needs_2 = bool(fields) or any(not isinstance(c, str) for c in captions.values())
    doc = {
        "format": SIDECAR_FORMAT_2 if needs_2 else SIDECAR_FORMAT,
        "shard": shard_name(shard),
        "source": source,
        "captions": captions,
    }
    if fields:
        doc["fields"] = fields
    return doc


def write_sidecar(
    path: str | os.PathLike,
    shard: str | os.PathLike,
    source: str,
    captions: dict[str, Caption],
    fields: dict[str, dict[str, float]] | None = None,
) -> storage.Location:
    """Write a sidecar atomically. ``captions`` maps sample key -> caption (or a list of variants)."""
    text = json.dumps(sidecar_document(shard, source, captions, fields), ensure_ascii=False, allow_nan=False)
    return storage.write_bytes(storage.location(path), (text + "\n").encode("utf-8"))


def _load(path: storage.Location, shard: str | os.PathLike | None) -> dict:
    try:
        doc = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SidecarError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") not in FORMATS or not isinstance(doc.get("captions"), dict):
        raise SidecarError(f"{path}: not a caption sidecar (expected format {' or '.join(map(repr, FORMATS))})")
    if shard is not None and doc.get("shard") != shard_name(shard):
        raise SidecarError(f"{path}: sidecar was written for shard {doc.get('shard')!r}, not {shard_name(shard)!r}")
    if doc["format"] == SIDECAR_FORMAT_2:
        bad = next((k for k, c in doc["captions"].items() if _clean(c) is None and c is not None), None)
        if bad is not None:
            raise SidecarError(f"{path}: caption of sample {bad!r} is neither a string nor a list of strings")
    return doc


def read_sidecar(path: str | os.PathLike, shard: str | os.PathLike | None = None) -> dict[str, Caption]:
    """Read a sidecar's captions; if ``shard`` is given, refuse a sidecar written for another shard."""
    return _load(storage.location(path), shard)["captions"]


def read_sidecar_fields(path: str | os.PathLike, shard: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """The numeric fields of a sidecar (``{}`` for a format-1 sidecar)."""
    return _load(storage.location(path), shard).get("fields", {})


def load_sidecar(
    shard: str | os.PathLike, source: str, sidecar_dir: str | os.PathLike | None = None
) -> dict[str, Caption] | None:
    """The captions of ``source`` for ``shard`` (local or remote), or None when there is no sidecar."""
    path = sidecar_path(shard, source, sidecar_dir)
    if not storage.exists(path):
        return None
    return read_sidecar(path, shard=shard)
