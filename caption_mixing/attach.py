"""``python -m caption_mixing attach``: join a synthetic-caption source to WebDataset shards.

Writes one sidecar per shard (``{stem}.{name}.json``, see ``sidecar.py``) next to the shards or
in ``--sidecar-dir``; never modifies a shard. Captions come from a caption file (JSONL, Parquet,
CSV; keyed by sample key or by URL) or from the shards themselves (a member ``{key}.{ext}`` or a
field of ``{key}.json``, as MetaCLIP- and Recap-DataComp-style data carry them).

Resumable: per-shard results go to ``{name}.attach.json`` after every shard (atomically), and a
re-run skips shards already done. The run fails (exit 1) when coverage is below
``--min-coverage``; the sidecars written so far stay valid.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json
from caption_mixing.caption_index import CaptionIndex
from caption_mixing.shards import expand_shards
from caption_mixing.sidecar import sidecar_path, write_sidecar

REPORT_FORMAT = "caption_mixing.attach/1"


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first dot of the basename, extension = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


@dataclass
class ShardResult:
    samples: int = 0
    matched: int = 0
    missing: int = 0
    empty: int = 0

    def add(self, other: ShardResult) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def read_shard(path: str, want_exts: tuple[str, ...]) -> dict[str, dict[str, bytes]]:
    """Keys of a shard (in order) with the bytes of the members whose extension is in want_exts."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if key.startswith("__") or not ext:
                continue
            entry = out.setdefault(key, {})
            if ext in want_exts:
                entry[ext] = tar.extractfile(member).read()
    return out


def _usable(caption: object) -> bool:
    return isinstance(caption, str) and caption.strip() != ""


def captions_from_shard(
    members: dict[str, dict[str, bytes]], member_ext: str | None, json_field: str | None
) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, entry in members.items():
        if member_ext:
            if member_ext in entry:
                out[key] = entry[member_ext].decode("utf-8", errors="replace")
        elif "json" in entry:
            out[key] = json.loads(entry["json"]).get(json_field)
    return out


def attach(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards)
    folder = Path(args.sidecar_dir) if args.sidecar_dir else Path(shards[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    report_path = folder / f"{args.name}.attach.json"
    done: dict[str, dict] = {}
    if report_path.exists() and not args.force:
        previous = json.loads(report_path.read_text())
        if previous.get("settings") == _settings(args):
            done = previous.get("shards", {})

    index = None
    if args.captions:
        db = Path(args.index) if args.index else folder / f".{args.name}.captions.sqlite"
        index = CaptionIndex.open_or_build(args.captions, db, args.key_field, args.caption_field, not args.quiet)

    want = ("json",) if (args.join_on == "url" or args.from_json_field) else ()
    if args.from_member:
        want = (args.from_member,)
    total = ShardResult()
    bar = tqdm(shards, desc=f"attach {args.name}", unit="shard", disable=args.quiet)
    for shard in bar:
        out = sidecar_path(shard, args.name, args.sidecar_dir)
        name = os.path.basename(shard)
        if name in done and out.exists():
            total.add(ShardResult(**done[name]))
            continue
        members = read_shard(shard, want)
        if index is not None:
            if args.join_on == "url":
                urls = {k: json.loads(e["json"]).get("url") for k, e in members.items() if "json" in e}
                by_url = index.lookup(u for u in urls.values() if u)
                found = {k: by_url[u] for k, u in urls.items() if u in by_url}
            else:
                found = index.lookup(members)
        else:
            found = captions_from_shard(members, args.from_member, args.from_json_field)
        result = ShardResult(samples=len(members))
        captions: dict[str, str] = {}
        for key in members:
            if key not in found:
                result.missing += 1
            elif not _usable(found[key]):
                result.empty += 1
            else:
                captions[key] = found[key]
        result.matched = len(captions)
        write_sidecar(out, shard, args.name, captions)
        done[name] = asdict(result)
        total.add(result)
        _write_report(report_path, args, done, total, index, final=False)
        bar.set_postfix(coverage=f"{total.matched / max(total.samples, 1):.3f}")
    bar.close()

    report = _write_report(report_path, args, done, total, index, final=True)
    if index is not None and not args.keep_index and report["coverage"] >= args.min_coverage:
        index.close()
        index.db_path.unlink(missing_ok=True)
    print(format_report(report))
    if report["coverage"] < args.min_coverage:
        print(
            f"error: coverage {report['coverage']:.4f} is below --min-coverage {args.min_coverage} "
            f"({total.missing} samples without a caption, {total.empty} empty); sidecars are written, "
            f"re-run with --min-coverage {report['coverage']:.2f} to accept"
        )
        return 1
    return 0


def _settings(args: argparse.Namespace) -> dict:
    keys = ("shards", "name", "captions", "key_field", "caption_field", "join_on", "from_member", "from_json_field")
    return {k: getattr(args, k) for k in keys}


def _write_report(path: Path, args, done: dict, total: ShardResult, index: CaptionIndex | None, final: bool) -> dict:
    report = {
        "format": REPORT_FORMAT,
        "settings": _settings(args),
        "complete": final and len(done) == len(expand_shards(args.shards)),
        "shards_done": len(done),
        **asdict(total),
        "coverage": total.matched / total.samples if total.samples else 0.0,
        "caption_records": len(index) if (index is not None and final) else None,
        "extra_keys": (len(index) - total.matched - total.empty) if (index is not None and final) else None,
        "duplicate_keys": 0,  # a duplicate stops indexing with an error naming key and rows
        "shards": done,
    }
    atomic_write_json(path, report)
    return report


def format_report(report: dict) -> str:
    rows = [
        ("shards", report["shards_done"]),
        ("samples", report["samples"]),
        ("matched", report["matched"]),
        ("missing (no caption)", report["missing"]),
        ("empty captions", report["empty"]),
        ("extra keys (not in shards)", report["extra_keys"] if report["extra_keys"] is not None else "n/a"),
        ("duplicate keys", report["duplicate_keys"]),
        ("coverage", f"{report['coverage']:.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern, e.g. 'data/{00000..01242}.tar'")
    p.add_argument("--name", required=True, help="caption source name, e.g. altogether_r3 (sidecar suffix)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="caption file: .jsonl, .parquet, .csv or .tsv (optionally .gz)")
    src.add_argument(
        "--from-member", metavar="EXT", help="captions inside the shards as {key}.EXT, e.g. altogether.txt"
    )
    src.add_argument("--from-json-field", metavar="FIELD", help="captions inside the shards as a field of {key}.json")
    p.add_argument("--key-field", default="key", help="caption file field holding the sample key (or URL)")
    p.add_argument("--caption-field", default="caption", help="caption file field holding the caption")
    p.add_argument(
        "--join-on", choices=["key", "url"], default="key", help="match on sample key or on the url in {key}.json"
    )
    p.add_argument("--sidecar-dir", help="write sidecars here instead of next to the shards")
    p.add_argument("--min-coverage", type=float, default=0.95, help="fail below this share of samples matched")
    p.add_argument("--index", help="path of the SQLite caption index (default: hidden file in the sidecar folder)")
    p.add_argument("--keep-index", action="store_true", help="keep the caption index after a successful run")
    p.add_argument("--force", action="store_true", help="redo shards already attached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
