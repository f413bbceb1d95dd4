"""Per-shard synthetic-caption sidecars.

A sidecar holds one caption source (e.g. ``altogether``) for one WebDataset shard, as a JSON
object ``{"format", "shard", "source", "captions": {sample_key: caption}}``. It lives next to
the shard as ``{shard_stem}.{source}.json`` (or in a separate folder with the same name), so
captions are joined to samples one shard at a time: memory is bounded by the shard, not the
corpus, and source shards are never modified. A source name becomes part of a file name, so it
must be a plain name (``paths.validate_name``): ``x/../../y`` is refused before any file is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from caption_mixing.atomic import atomic_write_json
from caption_mixing.paths import validate_name

SIDECAR_FORMAT = "caption_mixing.sidecar/1"


class SidecarError(ValueError):
    """A sidecar file that is malformed or belongs to a different shard."""


def shard_stem(shard: str | os.PathLike) -> str:
    """``data/00012.tar`` -> ``00012`` (also for ``.tar.gz`` and URLs)."""
    name = os.path.basename(str(shard).rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def sidecar_path(shard: str | os.PathLike, source: str, sidecar_dir: str | os.PathLike | None = None) -> Path:
    """Where the sidecar of caption source ``source`` for ``shard`` lives (``source`` must be a plain name)."""
    validate_name(source, "caption source")
    folder = Path(sidecar_dir) if sidecar_dir is not None else Path(str(shard)).parent
    return folder / f"{shard_stem(shard)}.{source}.json"


def write_sidecar(path: str | os.PathLike, shard: str | os.PathLike, source: str, captions: dict[str, str]) -> Path:
    """Write a sidecar atomically. ``captions`` maps sample key -> caption."""
    doc = {
        "format": SIDECAR_FORMAT,
        "shard": os.path.basename(str(shard)),
        "source": source,
        "captions": captions,
    }
    return atomic_write_json(path, doc, indent=None)


def read_sidecar(path: str | os.PathLike, shard: str | os.PathLike | None = None) -> dict[str, str]:
    """Read a sidecar; if ``shard`` is given, refuse a sidecar written for another shard."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SidecarError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT or not isinstance(doc.get("captions"), dict):
        raise SidecarError(f"{path}: not a caption sidecar (expected format {SIDECAR_FORMAT!r})")
    if shard is not None and doc.get("shard") != os.path.basename(str(shard)):
        raise SidecarError(
            f"{path}: sidecar was written for shard {doc.get('shard')!r}, not {os.path.basename(str(shard))!r}"
        )
    return doc["captions"]
