"""MetaCLIP's caption layout, both ways, so its trainer and this suite can share caption sets.

MetaCLIP's ``syn_ratio`` training reads one JSON object per shard at
``{cap_dir}/{shard_id % 100}/{shard_id}.json`` = ``{uuid: caption}`` (its captioner writes
``{uuid: {"altogether": caption}}``), where the shard id is the shard's number and the uuid is the
sample key. ``export`` writes that layout from this suite's sidecars; ``import`` (``attach
--format metaclip``, in ``caption_mixing.attach``) reads it back into sidecars, one shard at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from caption_mixing import storage
from caption_mixing.paths import validate_name
from caption_mixing.shards import expand_shards
from caption_mixing.sidecar import load_sidecar, shard_stem

CAPTIONER_FIELD = "altogether"


class MetaclipLayoutError(ValueError):
    """A shard without a number, or a caption file that is not one JSON object."""


def shard_id(shard: str) -> int:
    """The MetaCLIP shard number of ``.../00012.tar`` (12); a stem that is not a number is an error."""
    stem = shard_stem(shard)
    if not stem.isdigit():
        raise MetaclipLayoutError(f"shard {shard}: MetaCLIP's layout needs numbered shards, not {stem!r}")
    return int(stem)


def caption_file(cap_dir: str, shard: str) -> storage.Location:
    """``{cap_dir}/{shard_id % 100}/{shard_id}.json``."""
    n = shard_id(shard)
    return storage.join(storage.join(storage.location(cap_dir), str(n % 100)), f"{n}.json")


def read_shard_captions(cap_dir: str, shard: str, warn: Callable[[str, str], None] | None = None) -> dict:
    """The ``{uuid: caption}`` (or captioner ``{uuid: {field: caption}}``) object of one shard; ``{}``
    with a warning when the shard has no caption file."""
    path = caption_file(cap_dir, shard)
    if not storage.exists(path):
        if warn is not None:
            warn("metaclip_missing", f"no MetaCLIP caption file {path} for shard {shard}: its samples get no caption")
        return {}
    try:
        doc = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetaclipLayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise MetaclipLayoutError(f"{path}: expected one JSON object {{uuid: caption}}, found a {type(doc).__name__}")
    return doc


def export(args: argparse.Namespace) -> int:
    """Write MetaCLIP's layout from the sidecars of one source (first variant where a sample has several)."""
    source = validate_name(args.source, "--source")
    shards = expand_shards(args.shards)
    field = validate_name(args.captioner_field, "--captioner-field") if args.captioner_field else None
    missing = [s for s in shards if load_sidecar(s, source, args.sidecar_dir) is None]
    if missing:
        print(f"error: {len(missing)} shards have no {source} sidecar (first: {missing[0]}); nothing exported")
        return 1
    written = captions = multi = 0
    for shard in shards:
        table = load_sidecar(shard, source, args.sidecar_dir) or {}
        out = {}
        for key, caption in table.items():
            if isinstance(caption, list):
                multi += 1
                caption = caption[0] if caption else ""
            out[key] = {field: caption} if field else caption
        text = json.dumps(out, ensure_ascii=False) + "\n"
        storage.write_bytes(caption_file(args.cap_dir, shard), text.encode("utf-8"))
        written += 1
        captions += len(out)
    print(f"wrote {captions} {source} captions of {written} shards to {args.cap_dir} ({{shard % 100}}/{{shard}}.json)")
    if multi:
        print(f"note: {multi} samples hold several variants; MetaCLIP takes one caption, the first was written")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern of the shards (numbered, as MetaCLIP's are)")
    p.add_argument("--source", required=True, help="caption source to export, e.g. altogether")
    p.add_argument("--cap-dir", required=True, help="MetaCLIP caption folder to write (local or fsspec URL)")
    p.add_argument("--sidecar-dir", help="where the sidecars are (default: beside the shards)")
    p.add_argument(
        "--captioner-field",
        help=f"write the captioner's {{uuid: {{FIELD: caption}}}} (e.g. {CAPTIONER_FIELD}), not {{uuid: caption}}",
    )


def main_export(args: argparse.Namespace) -> int:
    try:
        return export(args)
    except MetaclipLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
