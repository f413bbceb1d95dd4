"""``python -m caption_mixing attach``: join a synthetic-caption source to WebDataset shards.

Writes one sidecar per shard (``{stem}.{name}.json``, see ``sidecar.py``) next to the shards or
in ``--sidecar-dir``; never modifies a shard. Captions come from a caption file (JSONL, Parquet,
CSV; keyed by sample key or by URL) or from the shards themselves (a member ``{key}.{ext}`` or a
field of ``{key}.json``, as MetaCLIP- and Recap-DataComp-style data carry them).

Nothing is replaced until every check passes: new sidecars are written under staging names
(``.{stem}.{name}.json.staged``, which no reader looks at); when all shards are read, the checks
run (a sample key in two shards is refused naming both; coverage must reach ``--min-coverage``),
and only then are the staged files renamed over the sidecars. When a check fails, the staged files
are deleted and every existing sidecar stays as it was (exit 1, and the message says so).

Resumable: per-shard results go to ``{name}.attach.json`` as shards are staged, and a re-run with
the same settings (and an unchanged caption file) skips shards whose staged sidecar exists; a
re-run after a complete attach does nothing. A re-run also finishes renames cut short by a kill,
and removes temp files that killed writes of this source left behind.

Bad input: a shard that is not a readable tar is an error naming it (exit 1, nothing changed). A
truncated shard is a warning naming the shard, the byte offset and the sample cut; its complete
samples are attached and the report lists it under ``truncated_shards``. An empty caption file is
an error. Caption bytes that are not UTF-8 are replaced with U+FFFD and reported (file and lines,
or shard and key) and counted (``bad_utf8``). Exit status: 0 attached, 1 a data problem (nothing
changed), 2 bad arguments such as a ``--name`` that is not a plain name.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json, remove_stale_temps
from caption_mixing.caption_files import CaptionFileError
from caption_mixing.caption_index import CaptionIndex, DuplicateKeyError, file_fingerprint
from caption_mixing.paths import check_output_dir, validate_name
from caption_mixing.shards import UNREADABLE_TAR, ShardReadError, expand_shards, read_tar_samples, split_member
from caption_mixing.sidecar import sidecar_path, write_sidecar

__all__ = ["AttachError", "ShardResult", "add_cli_arguments", "attach", "format_report", "split_member"]

REPORT_FORMAT = "caption_mixing.attach/2"
STAGED_SUFFIX = ".staged"
WARN_LIMIT = 10  # warnings of one kind printed one by one; the report counts them all
SAVE_EVERY_S = 5.0  # progress report writes while staging (a kill redoes at most this much)


class AttachError(ValueError):
    """A data problem that stops ``attach`` before any sidecar is replaced."""


@dataclass
class ShardResult:
    samples: int = 0
    matched: int = 0
    missing: int = 0
    empty: int = 0
    bad_utf8: int = 0  # in-shard captions whose bytes are not UTF-8 (replaced, still used)

    def add(self, other: ShardResult) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    @classmethod
    def from_entry(cls, entry: dict) -> ShardResult:
        return cls(**{f.name: entry.get(f.name, 0) for f in fields(cls)})


def staged_path(final: Path) -> Path:
    """Where a sidecar waits for the checks: a hidden name beside its final place."""
    return final.with_name(f".{final.name}{STAGED_SUFFIX}")


class _Warnings:
    """Print the first ``WARN_LIMIT`` warnings of each kind to stderr, then one line saying more follow."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= WARN_LIMIT:
            print(f"warning: {message}", file=sys.stderr)
        elif self.counts[kind] == WARN_LIMIT + 1:
            print(f"warning: more {kind} problems follow; the report counts them all", file=sys.stderr)


def read_shard(shard: str, want: tuple[str, ...], warn: _Warnings) -> tuple[dict[str, dict[str, bytes]], dict | None]:
    """Keys of a shard (in order) with the bytes of the members whose extension is in ``want``.

    A shard that is not a readable tar is an ``AttachError``; a truncated one is a warning, and its
    complete samples are returned with the problem (shard, offset, key cut) as a dict.
    """
    out: dict[str, dict[str, bytes]] = {}
    try:
        for sample in read_tar_samples(shard, want):
            key = sample["__key__"]
            if key in out:
                raise AttachError(f"sample key {key!r} appears twice in shard {shard}; sample keys must be unique")
            out[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    except ShardReadError as e:
        if e.kind == UNREADABLE_TAR:
            raise AttachError(str(e)) from None
        warn("truncated_tar", str(e))
        return out, e.as_dict()
    return out, None


def _usable(caption: object) -> bool:
    return isinstance(caption, str) and caption.strip() != ""


def _text(raw: bytes, shard: str, key: str, what: str, warn: _Warnings, result: ShardResult) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        result.bad_utf8 += 1
        warn("bad_utf8", f"{what} of sample {key!r} in shard {shard} is not UTF-8 ({e.reason}); bytes replaced")
        return raw.decode("utf-8", errors="replace")


def _json(entry: dict[str, bytes], shard: str, key: str, warn: _Warnings, result: ShardResult) -> dict:
    """The sample's ``.json`` member as a dict; unparsable JSON is a warning and counts as absent."""
    if "json" not in entry:
        return {}
    try:
        doc = json.loads(_text(entry["json"], shard, key, "json", warn, result))
    except json.JSONDecodeError as e:
        warn("bad_json", f"{key}.json in shard {shard} is not valid JSON ({e.msg}); the sample has no caption")
        return {}
    return doc if isinstance(doc, dict) else {}


def captions_from_shard(
    members: dict[str, dict[str, bytes]],
    member_ext: str | None,
    json_field: str | None,
    shard: str = "",
    warn: _Warnings | None = None,
    result: ShardResult | None = None,
) -> dict[str, object]:
    """Captions carried by the shard: member ``{key}.{member_ext}`` or field ``json_field`` of ``{key}.json``."""
    warn = _Warnings() if warn is None else warn
    result = ShardResult() if result is None else result
    out: dict[str, object] = {}
    for key, entry in members.items():
        if member_ext:
            if member_ext in entry:
                out[key] = _text(entry[member_ext], shard, key, member_ext, warn, result)
        elif "json" in entry:
            out[key] = _json(entry, shard, key, warn, result).get(json_field)
    return out


class KeyRegistry:
    """Sample keys of the shards staged so far, in SQLite beside the report (memory stays flat).

    Refuses a key already seen in another shard (naming both), and remembers which caption-file
    record each sample matched, so ``extra_keys`` counts records no sample matched, exactly.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA synchronous=OFF")
        table = "CREATE TABLE IF NOT EXISTS keys (key BLOB PRIMARY KEY, shard TEXT, found BLOB) WITHOUT ROWID"
        self.conn.execute(table)
        self.conn.execute("CREATE INDEX IF NOT EXISTS by_shard ON keys (shard)")
        self.conn.commit()

    @staticmethod
    def _b(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")  # tar names may hold bytes that are not UTF-8

    def keep_only(self, shards: set[str]) -> None:
        """Forget the keys of shards not in ``shards`` (staged before a kill, but not recorded as done)."""
        stale = [s for (s,) in self.conn.execute("SELECT DISTINCT shard FROM keys") if s not in shards]
        with self.conn:
            self.conn.executemany("DELETE FROM keys WHERE shard=?", [(s,) for s in stale])

    def add(self, shard: str, keys: Iterable[str], found: dict[str, str]) -> None:
        rows = [(self._b(k), shard, self._b(found[k]) if k in found else None) for k in keys]
        try:
            with self.conn:
                self.conn.execute("DELETE FROM keys WHERE shard=?", (shard,))
                self.conn.executemany("INSERT INTO keys VALUES (?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            for key, _, _ in rows:
                other = self.conn.execute("SELECT shard FROM keys WHERE key=?", (key,)).fetchone()
                if other is not None:
                    name = key.decode("utf-8", "replace")
                    raise AttachError(
                        f"sample key {name!r} is in two shards: {other[0]} and {shard}; "
                        "sample keys must be unique across shards"
                    ) from None
            raise

    def found_distinct(self) -> int:
        return self.conn.execute("SELECT COUNT(DISTINCT found) FROM keys WHERE found IS NOT NULL").fetchone()[0]

    def close(self, delete: bool = False) -> None:
        self.conn.close()
        if delete:
            for p in (self.path, self.path.with_name(self.path.name + "-journal")):
                p.unlink(missing_ok=True)


def _settings(args: argparse.Namespace) -> dict:
    keys = ("shards", "name", "captions", "key_field", "caption_field", "join_on", "from_member", "from_json_field")
    fingerprint = file_fingerprint(Path(args.captions), args.key_field, args.caption_field) if args.captions else None
    return {**{k: getattr(args, k) for k in keys}, "sidecar_dir": args.sidecar_dir, "caption_file": fingerprint}


class _Attach:
    """One ``attach`` run: stage every shard's sidecar, check, then install (or discard)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = validate_name(args.name, "--name")
        if not 0.0 <= args.min_coverage <= 1.0:
            raise ValueError(f"--min-coverage: {args.min_coverage} is not a share in [0, 1]")
        self.shards = expand_shards(args.shards)
        if args.sidecar_dir:
            self.folder = check_output_dir(args.sidecar_dir, "--sidecar-dir")
        else:
            self.folder = Path(self.shards[0]).parent
        self.finals = {s: sidecar_path(s, self.name, args.sidecar_dir) for s in self.shards}
        if len(set(self.finals.values())) < len(self.finals):
            seen: dict[Path, str] = {}
            for s, f in self.finals.items():
                if f in seen:
                    raise ValueError(f"--shards: {seen[f]} and {s} would share the sidecar {f}; use separate folders")
                seen[f] = s
        self.report_path = self.folder / f"{self.name}.attach.json"
        self.settings = _settings(args)
        self.warn = _Warnings()
        self.index: CaptionIndex | None = None
        self.registry: KeyRegistry | None = None

    def remove_stale_temps(self) -> int:
        targets: dict[Path, set[str]] = {self.folder: {self.report_path.name}}
        for final in self.finals.values():
            targets.setdefault(final.parent, set()).update({final.name, staged_path(final).name})
        return sum(len(remove_stale_temps(folder, names)) for folder, names in targets.items())

    def previous(self) -> dict | None:
        """The report of an earlier run with the same settings (None with ``--force`` or none)."""
        if self.args.force or not self.report_path.exists():
            return None
        try:
            prev = json.loads(self.report_path.read_text())
        except json.JSONDecodeError:
            return None
        ok = prev.get("format") == REPORT_FORMAT and prev.get("settings") == self.settings
        return prev if ok and prev.get("state") not in (None, "failed") else None

    def resume(self, prev: dict | None) -> dict[str, dict]:
        """Shards already staged (or installed by a run killed while renaming); clears anything else."""
        keys_path = self.folder / f".{self.name}.keys.sqlite"
        done: dict[str, dict] = {}
        if prev is not None and prev["state"] != "installed":
            renaming = prev["state"] == "installing"
            for shard, entry in prev.get("shards", {}).items():
                final = self.finals.get(shard)
                if final is not None and (staged_path(final).exists() or (renaming and final.exists())):
                    done[shard] = entry
        if not done:
            for final in self.finals.values():
                staged_path(final).unlink(missing_ok=True)
            KeyRegistry(keys_path).close(delete=True)
        self.registry = KeyRegistry(keys_path)
        self.registry.keep_only(set(done))
        return done

    def open_index(self) -> None:
        if self.args.captions:
            a = self.args
            db = Path(a.index) if a.index else self.folder / f".{self.name}.captions.sqlite"
            self.index = CaptionIndex.open_or_build(a.captions, db, a.key_field, a.caption_field, not a.quiet)
            bad = self.index.bad_utf8
            if bad["count"]:
                lines = ", ".join(map(str, bad["lines"])) + (", ..." if bad["count"] > len(bad["lines"]) else "")
                self.warn("bad_utf8", f"{a.captions}: {bad['count']} lines are not UTF-8 (lines {lines}); replaced")

    def match(self, shard: str, members: dict[str, dict[str, bytes]]) -> tuple[ShardResult, dict, dict[str, str]]:
        """(counts, captions to write, sample key -> caption-file key it matched)."""
        a, result = self.args, ShardResult(samples=len(members))
        matched_on: dict[str, str] = {}
        if self.index is not None:
            if a.join_on == "url":
                urls = {k: _json(e, shard, k, self.warn, result).get("url") for k, e in members.items()}
                by_url = self.index.lookup(u for u in urls.values() if isinstance(u, str))
                found = {k: by_url[u] for k, u in urls.items() if isinstance(u, str) and u in by_url}
                matched_on = {k: urls[k] for k in found}
            else:
                found = self.index.lookup(members)
                matched_on = {k: k for k in found}
        else:
            found = captions_from_shard(members, a.from_member, a.from_json_field, shard, self.warn, result)
        captions: dict[str, str] = {}
        for key in members:
            if key not in found:
                result.missing += 1
            elif not _usable(found[key]):
                result.empty += 1
            else:
                captions[key] = found[key]
        result.matched = len(captions)
        return result, captions, matched_on

    def stage(self, done: dict[str, dict]) -> None:
        """Read every shard not yet done and write its sidecar under the staging name."""
        a = self.args
        want = ("json",) if (a.join_on == "url" or a.from_json_field) else ()
        if a.from_member:
            want = (a.from_member.lower(),)
        pending = [s for s in self.shards if s not in done]
        last_save = time.monotonic()
        for shard in tqdm(pending, desc=f"attach {self.name}", unit="shard", disable=a.quiet):
            members, truncated = read_shard(shard, want, self.warn)
            result, captions, matched_on = self.match(shard, members)
            self.registry.add(shard, members, matched_on)
            write_sidecar(staged_path(self.finals[shard]), shard, self.name, captions)
            done[shard] = {**asdict(result), "truncated": truncated}
            if time.monotonic() - last_save > SAVE_EVERY_S:
                self.write_report(done, "staging", final=False)
                last_save = time.monotonic()

    def write_report(self, done: dict[str, dict], state: str, final: bool = True) -> dict:
        total = ShardResult()
        for entry in done.values():
            total.add(ShardResult.from_entry(entry))
        counted = final and self.index is not None
        report = {
            "format": REPORT_FORMAT,
            "settings": self.settings,
            "state": state,
            "complete": state == "installed" and len(done) == len(self.shards),
            "shards_done": len(done),
            **asdict(total),
            "coverage": total.matched / total.samples if total.samples else 0.0,
            "caption_records": len(self.index) if counted else None,
            "extra_keys": len(self.index) - self.registry.found_distinct() if counted else None,
            "duplicate_keys": 0,  # a duplicate stops the run naming the key (caption file: rows; shards: both)
            "caption_file_bad_utf8": self.index.bad_utf8["count"] if counted else None,
            "truncated_shards": [e["truncated"] for e in done.values() if e.get("truncated")],
            "shards": done if state != "failed" else {},
        }
        atomic_write_json(self.report_path, report)
        return report

    def discard(self, done: dict[str, dict]) -> None:
        """A failed check: delete the staged sidecars and the key list; existing sidecars stay untouched."""
        for final in self.finals.values():
            staged_path(final).unlink(missing_ok=True)
        if self.registry is not None:
            self.registry.close(delete=True)
        self.write_report(done, "failed", final=False)

    def close(self) -> None:
        for db in (self.index, self.registry):
            if db is not None:
                db.close()

    def install(self, done: dict[str, dict]) -> dict:
        """Rename every staged sidecar into place; the report says ``installing`` until all are."""
        self.write_report(done, "installing")
        for final in self.finals.values():
            staged = staged_path(final)
            if staged.exists():
                os.replace(staged, final)
        report = self.write_report(done, "installed")
        self.registry.close(delete=True)
        if self.index is not None and not self.args.keep_index:
            self.index.close()
            self.index.db_path.unlink(missing_ok=True)
        return report


def _coverage_problem(report: dict, min_coverage: float) -> str | None:
    if report["coverage"] >= min_coverage:
        return None
    why = f"{report['missing']} samples without a caption, {report['empty']} with an empty one"
    if report["matched"] == 0 and report["caption_records"]:
        if report["missing"] == report["samples"]:
            why += "; no caption record matched a sample key: are --key-field and --join-on right for these shards?"
        else:
            why += "; every matched caption is empty"
    return f"coverage {report['coverage']:.4f} is below --min-coverage {min_coverage} ({why})"


def attach(args: argparse.Namespace) -> int:
    run = _Attach(args)  # bad arguments raise ValueError here, before anything is written
    run.folder.mkdir(parents=True, exist_ok=True)
    removed = run.remove_stale_temps()
    if removed and not args.quiet:
        print(f"removed {removed} temp files left by killed writes of {run.name}", file=sys.stderr)
    prev = run.previous()
    if prev is not None and prev["state"] == "installed" and all(f.exists() for f in run.finals.values()):
        print(f"all {len(run.shards)} sidecars of {run.name} are in place from an earlier run with these settings")
        print(format_report(prev))
        return 0
    done = run.resume(prev)
    try:
        return _stage_check_install(run, done)
    finally:
        run.close()


def _stage_check_install(run: _Attach, done: dict[str, dict]) -> int:
    unchanged = f"nothing was installed: existing {run.name} sidecars are unchanged"
    try:
        run.open_index()
        run.stage(done)
        report = run.write_report(done, "checking")
    except (AttachError, CaptionFileError, DuplicateKeyError) as e:
        run.discard(done)
        print(f"error: {e}; {unchanged}", file=sys.stderr)
        return 1
    print(format_report(report))
    problem = _coverage_problem(report, run.args.min_coverage)
    if problem is not None:
        run.discard(done)
        print(f"error: {problem}; {unchanged} (re-run with --min-coverage {report['coverage']:.2f} to accept)")
        return 1
    run.install(done)
    return 0


def format_report(report: dict) -> str:
    def shown(value: object) -> object:
        return "n/a" if value is None else value

    rows = [
        ("shards", report["shards_done"]),
        ("samples", report["samples"]),
        ("matched", report["matched"]),
        ("missing (no caption)", report["missing"]),
        ("empty captions", report["empty"]),
        ("extra keys (not in shards)", shown(report["extra_keys"])),
        ("duplicate keys", report["duplicate_keys"]),
        ("not UTF-8 (replaced)", report["bad_utf8"] + (report["caption_file_bad_utf8"] or 0)),
        ("truncated shards", len(report["truncated_shards"])),
        ("coverage", f"{report['coverage']:.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern, e.g. 'data/{00000..01242}.tar'")
    p.add_argument(
        "--name", required=True, help="caption source name, e.g. altogether_r3 (sidecar suffix; letters, digits, ._-)"
    )
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
