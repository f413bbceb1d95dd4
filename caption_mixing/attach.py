"""``python -m caption_mixing attach``: join caption sources to WebDataset shards as sidecars.

Writes one sidecar per shard and source (``{stem}.{source}.json``, see ``sidecar.py``) next to the
shards or in ``--sidecar-dir`` (local or an fsspec URL); never modifies a shard. Captions come from
caption files as published (``--format``: DreamLIP, CapsFusion, PixelProse, Recap-DataComp,
VeCap, DataComp BLIP2, LaCLIP, MetaCLIP, or generic JSONL/Parquet/CSV/TSV/JSON-dict; see
``releases.py``), joined on the sample key, URL, image SHA-256, DataComp uid or input row
(``joins.py``), or from the shards themselves (a member ``{key}.{ext}``, a field of
``{key}.json``, DataCompDR's ``syn.json``). One pass can write several sources (``--columns``); a
source may hold several variants per image, and numeric columns can come along (``--fields``).

Nothing is replaced until every check passes: new sidecars are written under staging names
(``.{stem}.{source}.json.staged``, which no reader looks at); when all shards are read, the
checks run (a sample key in two shards is refused naming both; coverage must reach
``--min-coverage``; a row join must agree with the original captions), and only then are the
staged files renamed over the sidecars. When a check fails, the staged files are deleted and
every existing sidecar stays as it was (exit 1, and the message says so).

Resumable: per-shard results go to ``{name}.attach.json`` as shards are staged, and a re-run with
the same settings (and unchanged caption files) skips shards whose staged sidecars exist; a re-run
after a complete attach does nothing. A re-run also finishes renames cut short by a kill, and
removes temp files that killed writes of these sources left behind.

``python -m caption_mixing import`` is ``attach --format metaclip`` with MetaCLIP's words for the
flags (``--cap-dir``); ``export`` (``metaclip.py``) writes MetaCLIP's layout from sidecars.

The report counts per source: samples matched, missing, empty; the file's records no sample
matched (extra), repeated join values in the file (and the rule applied) and samples sharing a
join value; and the synthetic share a p realizes with that coverage (``coverage.py``).

Bad input: a shard that is not a readable tar is an error naming it (exit 1, nothing changed). A
truncated shard is a warning naming the shard, the byte offset and the sample cut; its complete
samples are attached and the report lists it under ``truncated_shards``. An empty caption file is
an error. Caption bytes that are not UTF-8 are replaced with U+FFFD and reported (file and lines,
or shard and key) and counted (``bad_utf8``). Exit status: 0 attached, 1 a data problem (nothing
changed), 2 bad arguments such as a ``--name`` that is not a plain name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from caption_mixing import storage
from caption_mixing.atomic import remove_stale_temps
from caption_mixing.caption_files import CaptionFileError
from caption_mixing.caption_index import CaptionIndex, DuplicateKeyError
from caption_mixing.coverage import share_table
from caption_mixing.mixing import parse_p_list
from caption_mixing.paths import check_output_dir
from caption_mixing.releases import AttachPlan, plan_from_args
from caption_mixing.releases import add_cli_arguments as add_plan_arguments
from caption_mixing.shard_join import AttachError, ShardJoiner, add_entries, join_shards, new_entry
from caption_mixing.shards import expand_shards, split_member
from caption_mixing.sidecar import sidecar_path, write_sidecar

__all__ = ["AttachError", "add_cli_arguments", "attach", "format_report", "split_member"]

REPORT_FORMAT = "caption_mixing.attach/3"
STAGED_SUFFIX = ".staged"
WARN_LIMIT = 10  # warnings of one kind printed one by one; the report counts them all
SAVE_EVERY_S = 30.0  # progress report writes while staging (a kill redoes at most this much)
ROW_MISMATCH_LIMIT = 0.01  # share of checked rows whose original caption may differ before a row join fails
EXAMPLES = 5


def staged_path(final: storage.Location) -> storage.Location:
    """Where a sidecar waits for the checks: a hidden name beside its final place."""
    return storage.join(storage.parent(final), f".{storage.basename(final)}{STAGED_SUFFIX}")


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


def _digest(text: str) -> int:
    """A 64-bit digest of a join value: the registry counts distinct values without storing them."""
    raw = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


class KeyRegistry:
    """Sample keys of the shards staged so far, in SQLite in the work folder (memory stays flat).

    Refuses a key already seen in another shard (naming both), remembers which caption-file
    record each sample matched (so ``extra_keys`` counts records no sample matched) and the value
    each sample was joined on (so samples sharing a URL or hash are counted). Join values are kept
    as 64-bit digests, the record only where it differs from the join value (a normalized URL match).
    """

    def __init__(self, path: Path, shards: list[str]) -> None:
        self.path, self.shards = path, shards
        self.index = {s: i for i, s in enumerate(shards)}
        self.counted: dict[str, int] = {}  # totals, once every shard is in
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("PRAGMA cache_size=-16384")
        columns = "key BLOB PRIMARY KEY, shard INTEGER, matched INTEGER, joined INTEGER, found INTEGER"
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS keys ({columns}) WITHOUT ROWID")
        self.conn.commit()

    def keep_only(self, shards: set[str]) -> None:
        """Forget the keys of shards not in ``shards`` (staged before a kill, but not recorded as done)."""
        keep = {self.index[s] for s in shards if s in self.index}
        stale = [i for (i,) in self.conn.execute("SELECT DISTINCT shard FROM keys") if i not in keep]
        with self.conn:
            self.conn.executemany("DELETE FROM keys WHERE shard=?", [(i,) for i in stale])

    def add(self, shard: str, keys: Iterable[str], found: dict[str, str], joined: dict[str, str]) -> None:
        """Record a shard's samples (each shard once per run: ``keep_only`` clears a resumed one's)."""
        self.counted.clear()
        n, rows = self.index[shard], []
        for k in keys:
            j, f = joined.get(k), found.get(k)
            other = None if f is None or f == (j or k) else _digest(f)
            rows.append((k.encode("utf-8", "surrogateescape"), n, f is not None, j and _digest(j), other))
        try:
            with self.conn:
                self.conn.executemany("INSERT INTO keys VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            for key, *_ in rows:
                other = self.conn.execute("SELECT shard FROM keys WHERE key=?", (key,)).fetchone()
                if other is not None:
                    name = key.decode("utf-8", "replace")
                    raise AttachError(
                        f"sample key {name!r} is in two shards: {self.shards[other[0]]} and {shard}; "
                        "sample keys must be unique across shards"
                    ) from None
            raise

    def found_distinct(self) -> int:
        """Distinct caption-file records matched (counted once: the report is written several times).

        Both counts group rather than ``COUNT(DISTINCT)``: SQLite sorts for a GROUP BY (in bounded
        memory, spilling to disk), about three times faster than its b-tree of distinct values.
        """
        if "found" not in self.counted:
            sql = "SELECT COUNT(*) FROM (SELECT 1 FROM keys WHERE matched GROUP BY COALESCE(found, joined, key))"
            self.counted["found"] = self.conn.execute(sql).fetchone()[0]
        return self.counted["found"]

    def shared_join_values(self) -> int:
        """Samples whose join value (URL, hash, uid) another sample already has."""
        if "joined" not in self.counted:
            groups = "SELECT COUNT(*) n FROM keys WHERE joined IS NOT NULL GROUP BY joined"
            sql = f"SELECT COALESCE(SUM(n - 1), 0) FROM ({groups})"
            self.counted["joined"] = self.conn.execute(sql).fetchone()[0]
        return self.counted["joined"]

    def close(self, delete: bool = False) -> None:
        self.conn.close()
        if delete:
            for p in (self.path, self.path.with_name(self.path.name + "-journal")):
                p.unlink(missing_ok=True)


def _caption_files_fingerprint(plan: AttachPlan) -> list[str] | None:
    if plan.table is None:
        return None
    files = [*plan.table.paths, *([plan.table.original] if plan.table.original else [])]
    out = []
    for f in files:
        st = Path(f).stat()
        out.append(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return out


class _Attach:
    """One ``attach`` run: stage every shard's sidecars, check, then install (or discard)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = plan_from_args(args)
        self.ps = parse_p_list(args.p, "--p")
        self.shards = expand_shards(args.shards)
        if args.sidecar_dir and not storage.is_url(args.sidecar_dir):
            check_output_dir(args.sidecar_dir, "--sidecar-dir")
        self.finals = {
            (src, s): sidecar_path(s, src, args.sidecar_dir) for s in self.shards for src in self.plan.source_names
        }
        seen: dict[str, str] = {}
        for (_, s), f in self.finals.items():
            if seen.setdefault(str(f), s) != s:
                raise ValueError(f"--shards: {seen[str(f)]} and {s} would share the sidecar {f}; use separate folders")
        first = next(iter(self.finals.values()))
        self.folder = storage.parent(first)
        self.report_path = storage.join(self.folder, f"{self.plan.run_name}.attach.json")
        self.failed_path = storage.join(self.folder, f"{self.plan.run_name}.attach.failed.json")
        self.installed_report: bytes | None = None  # the report of sidecars in place, restored if this run fails
        self.work = self._work_dir()
        settings = {
            **self.plan.settings(),
            "shards": args.shards,
            "sidecar_dir": args.sidecar_dir,
            "caption_files": _caption_files_fingerprint(self.plan),
        }
        self.settings = json.loads(json.dumps(settings))  # as a report read back holds them (lists, not tuples)
        self.warn = _Warnings()
        self.index: CaptionIndex | None = None
        self.registry: KeyRegistry | None = None
        self.row_examples: list[str] = []

    def _work_dir(self) -> Path:
        """Where the SQLite files go: the sidecar folder when local, else a folder under the temp dir."""
        if isinstance(self.folder, Path):
            return self.folder
        digest = hashlib.sha1(f"{self.folder}|{self.plan.run_name}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "caption_mixing_attach" / digest

    def shards_of(self, shard: str) -> list[storage.Location]:
        return [self.finals[(src, shard)] for src in self.plan.source_names]

    def remove_stale_temps(self) -> int:
        targets: dict[Path, set[str]] = {}
        if isinstance(self.report_path, Path):
            targets[self.report_path.parent] = {self.report_path.name, storage.basename(self.failed_path)}
        for final in self.finals.values():
            if isinstance(final, Path):
                targets.setdefault(final.parent, set()).update({final.name, storage.basename(staged_path(final))})
        return sum(len(remove_stale_temps(folder, names)) for folder, names in targets.items())

    def previous(self) -> dict | None:
        """The report of an earlier run with the same settings (None with ``--force`` or none)."""
        if not storage.exists(self.report_path):
            return None
        raw = storage.read_bytes(self.report_path)
        try:
            prev = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if prev.get("state") == "installed":
            self.installed_report = raw
        if self.args.force:
            return None
        ok = prev.get("format") == REPORT_FORMAT and prev.get("settings") == self.settings
        return prev if ok and prev.get("state") not in (None, "failed") else None

    def resume(self, prev: dict | None) -> dict[str, dict]:
        """Shards already staged (or installed by a run killed while renaming); clears anything else."""
        keys_path = self.work / f".{self.plan.run_name}.keys.sqlite"
        done: dict[str, dict] = {}
        if prev is not None and prev["state"] != "installed":
            renaming = prev["state"] == "installing"
            for shard, entry in prev.get("shards", {}).items():
                if shard not in self.shards:
                    continue
                finals = self.shards_of(shard)
                if all(storage.exists(staged_path(f)) or (renaming and storage.exists(f)) for f in finals):
                    done[shard] = entry
        if not done:
            for final in self.finals.values():
                storage.unlink(staged_path(final))
            KeyRegistry(keys_path, self.shards).close(delete=True)
        self.registry = KeyRegistry(keys_path, self.shards)
        self.registry.keep_only(set(done))
        return done

    def open_index(self) -> None:
        plan, a = self.plan, self.args
        if plan.table is None:
            return
        db = Path(a.index) if a.index else self.work / f".{plan.run_name}.captions.sqlite"
        self.index = CaptionIndex.open_or_build(
            None,
            db,
            progress=not a.quiet,
            table=plan.table,
            normalize=plan.join == "url",
            duplicates=plan.duplicates,
        )
        self.index.conn.execute("PRAGMA cache_size=-2048")  # here only counts and metadata; joiners look up
        bad = self.index.bad_utf8
        for path, (count, lines) in bad.get("files", {}).items():
            shown = ", ".join(map(str, lines)) + (", ..." if count > len(lines) else "")
            self.warn("bad_utf8", f"{path}: {count} lines are not UTF-8 (lines {shown}); replaced")
        skipped = self.index.meta("skipped_rows", {"count": 0, "examples": []})
        for example in skipped["examples"][:WARN_LIMIT]:
            self.warn("skipped_row", f"{example}: row skipped")
        dup = self.index.meta("duplicates", {})
        if dup.get("conflicting"):
            shown = "; ".join(dup["examples"][:3])
            self.warn(
                "duplicates",
                f"{dup['conflicting']} records repeat a {plan.join} with a different caption (e.g. {shown}); "
                f"rule {dup['rule']!r}: " + ("the first is kept" if dup["rule"] == "first" else "none is kept"),
            )

    def stage(self, done: dict[str, dict]) -> None:
        """Join every shard not yet done and write its sidecars under the staging names; the shards
        are read and joined in reader processes (``--workers``), keys and files handled here."""
        pending = [s for s in self.shards if s not in done]
        last_save = time.monotonic()
        workers = self.args.workers
        if workers is None:  # other processes read and join when there is enough to do
            workers = 0 if len(pending) < 8 else max(1, min(4, (os.cpu_count() or 1) - 1))
        joiner = ShardJoiner(self.plan, None if self.index is None else self.index.db_path)
        bar = tqdm(pending, desc=f"attach {self.plan.run_name}", unit="shard", disable=self.args.quiet)
        try:
            with closing(join_shards(pending, joiner, workers)) as joined_shards:
                for shard, out in zip(bar, joined_shards, strict=True):
                    self._record(shard, out, done)
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        self.write_report(done, "staging", final=False)
                        last_save = time.monotonic()
        finally:
            joiner.close()

    def _record(self, shard: str, out: dict, done: dict[str, dict]) -> None:
        """One joined shard: its warnings printed, its keys registered, its sidecars staged."""
        for kind, message in out["warnings"]:
            self.warn(kind, message)
        self.row_examples += out["row_examples"][: max(0, EXAMPLES - len(self.row_examples))]
        self.registry.add(shard, out["keys"], out["found"], out["joined"])
        for src in self.plan.source_names:
            fields = out["fields"] or None
            write_sidecar(staged_path(self.finals[(src, shard)]), shard, src, out["captions"][src], fields)
        done[shard] = out["result"]

    def _sources_report(self, total: dict) -> dict:
        out = {}
        for src, c in total["sources"].items():
            coverage = c["matched"] / total["samples"] if total["samples"] else 0.0
            out[src] = {
                **c,
                "coverage": coverage,
                "variants_per_caption": c["variants"] / c["matched"] if c["matched"] else 0.0,
                "synthetic_share": share_table({"coverage": coverage}, self.ps),
            }
        return out

    def write_report(
        self, done: dict[str, dict], state: str, final: bool = True, path: storage.Location | None = None
    ) -> dict:
        total = new_entry(self.plan)
        for entry in done.values():
            add_entries(total, entry)
        sources = self._sources_report(total)
        worst = sources[min(sources, key=lambda s: (sources[s]["coverage"], s))]
        counted = final and self.index is not None
        dup = self.index.meta("duplicates") if counted else None
        extra = len(self.index) - self.registry.found_distinct() if counted else None
        if self.plan.provider == "metaclip" and final:
            extra = total.get("extra_records", 0)
        report = {
            "format": REPORT_FORMAT,
            "settings": self.settings,
            "state": state,
            "complete": state == "installed" and len(done) == len(self.shards),
            "release": self.plan.release,
            "shards_done": len(done),
            "samples": total["samples"],
            **{k: worst[k] for k in ("matched", "missing", "empty", "coverage")},
            "sources": sources,
            "caption_records": len(self.index) if counted else None,
            "extra_keys": extra,
            "duplicate_keys": dup["rows"] if dup else 0,
            "duplicates": {
                "file": dup,
                "samples_sharing_a_join_value": self.registry.shared_join_values() if final else None,
            },
            "normalized_matches": total["normalized"],
            "no_join_value": total["no_join_value"],
            "row_check": {
                "checked": total["row_checked"],
                "mismatched": total["row_mismatch"],
                "examples": self.row_examples,
            },
            "bad_utf8": total["bad_utf8"],
            "caption_file_bad_utf8": self.index.bad_utf8["count"] if counted else None,
            "skipped_rows": self.index.meta("skipped_rows", {}).get("count") if counted else None,
            "fields": total["fields"],
            "truncated_shards": [e["truncated"] for e in done.values() if e.get("truncated")],
            "shards": done if state != "failed" else {},
        }
        text = json.dumps(report, indent=1, allow_nan=False) + "\n"  # every share is a finite number
        storage.write_bytes(self.report_path if path is None else path, text.encode("utf-8"))
        return report

    def discard(self, done: dict[str, dict]) -> None:
        """A failed check: delete the staged sidecars and the key list; existing sidecars stay untouched,
        and so does the report describing them (this run's goes to ``{name}.attach.failed.json``)."""
        for final in self.finals.values():
            storage.unlink(staged_path(final))
        if self.registry is not None:
            self.registry.close(delete=True)
            self.registry = None
        if self.installed_report is None:
            self.write_report(done, "failed", final=False)
        else:
            self.write_report(done, "failed", final=False, path=self.failed_path)
            storage.write_bytes(self.report_path, self.installed_report)

    def close(self) -> None:
        for db in (self.index, self.registry):
            if db is not None:
                db.close()

    def install(self, done: dict[str, dict]) -> dict:
        """Rename every staged sidecar into place; the report says ``installing`` until all are."""
        self.write_report(done, "installing")
        for final in self.finals.values():
            staged = staged_path(final)
            if storage.exists(staged):
                storage.replace(staged, final)
        report = self.write_report(done, "installed")
        storage.unlink(self.failed_path)  # an earlier failure's report no longer describes these sidecars
        self.registry.close(delete=True)
        self.registry = None
        if self.index is not None and not self.args.keep_index:
            self.index.close()
            self.index.db_path.unlink(missing_ok=True)
            self.index = None
        return report


def _coverage_problem(name: str, counts: dict, report: dict, min_coverage: float) -> str | None:
    if counts["coverage"] >= min_coverage:
        return None
    why = f"{counts['missing']} samples without a caption, {counts['empty']} with an empty one"
    if counts["matched"] == 0 and (report["caption_records"] or report["caption_records"] is None):
        if counts["missing"] == report["samples"]:
            why += "; no caption record matched a sample key: are --key-field and --join-on right for these shards?"
        else:
            why += "; every matched caption is empty"
    prefix = f"{name}: " if len(report["sources"]) > 1 else ""
    return f"{prefix}coverage {counts['coverage']:.4f} is below --min-coverage {min_coverage} ({why})"


def check_report(report: dict, plan: AttachPlan) -> tuple[str | None, list[str]]:
    """(the problem that stops the attach, or None; notes printed without stopping it)."""
    notes = []
    for name, counts in report["sources"].items():
        problem = _coverage_problem(name, counts, report, plan.min_coverage)
        if problem is None:
            continue
        if plan.coverage_fatal or counts["matched"] == 0:
            return f"{problem}; re-run with --min-coverage {counts['coverage']:.2f} to accept", notes
        notes.append(f"{problem}; reported, not fatal for --format {plan.release} (give --min-coverage to enforce)")
    rows = report["row_check"]
    if rows["checked"] and rows["mismatched"] > ROW_MISMATCH_LIMIT * rows["checked"]:
        example = rows["examples"][0] if rows["examples"] else ""
        return (
            f"{rows['mismatched']} of {rows['checked']} row-joined samples do not match their row's original caption "
            f"(e.g. {example}): the input file's order differs from the one the captions are aligned with, or "
            "--rows-per-shard is not the downloader's number_sample_per_shard"
        ), notes
    return None, notes


def attach(args: argparse.Namespace) -> int:
    run = _Attach(args)  # bad arguments raise ValueError here, before anything is written
    run.work.mkdir(parents=True, exist_ok=True)
    storage.makedirs(run.folder)
    removed = run.remove_stale_temps()
    if removed and not args.quiet:
        print(f"removed {removed} temp files left by killed writes of {run.plan.run_name}", file=sys.stderr)
    prev = run.previous()
    if prev is not None and prev["state"] == "installed" and all(storage.exists(f) for f in run.finals.values()):
        name = run.plan.run_name
        print(f"all {len(run.finals)} sidecars of {name} are in place from an earlier run with these settings")
        print(format_report(prev))
        return 0
    done = run.resume(prev)
    try:
        return _stage_check_install(run, done)
    finally:
        run.close()


def _stage_check_install(run: _Attach, done: dict[str, dict]) -> int:
    names = ", ".join(run.plan.source_names)
    unchanged = f"nothing was installed: existing {names} sidecars are unchanged"
    try:
        run.open_index()
        run.stage(done)
        report = run.write_report(done, "checking")
    except (AttachError, CaptionFileError, DuplicateKeyError) as e:
        run.discard(done)
        print(f"error: {e}; {unchanged}", file=sys.stderr)
        return 1
    print(format_report(report))
    problem, notes = check_report(report, run.plan)
    for note in notes:
        print(f"note: {note}")
    if problem is not None:
        run.discard(done)
        print(f"error: {problem}; {unchanged}")
        return 1
    run.install(done)
    return 0


def format_report(report: dict) -> str:
    """The coverage report: shared counts, then one row per source with the share p realizes."""

    def shown(value: object) -> object:
        return "n/a" if value is None else value

    dup = report.get("duplicates", {})
    file_dup = dup.get("file") or {}
    rows = [
        ("shards", report["shards_done"]),
        ("samples", report["samples"]),
        ("caption records", shown(report["caption_records"])),
        ("extra records (in no shard)", shown(report["extra_keys"])),
        (
            "repeated join values in the file",
            f"{file_dup.get('rows', 0)} ({file_dup.get('conflicting', 0)} with another caption; "
            f"rule: {file_dup.get('rule', 'n/a')})",
        ),
        ("samples sharing a join value", f"{shown(dup.get('samples_sharing_a_join_value'))} (each gets the caption)"),
        ("matched after normalizing", report["normalized_matches"]),
        ("no join value in the sample", report["no_join_value"]),
        ("rows checked / not matching", f"{report['row_check']['checked']} / {report['row_check']['mismatched']}"),
        ("not UTF-8 (replaced)", report["bad_utf8"] + (report["caption_file_bad_utf8"] or 0)),
        ("skipped malformed rows", shown(report["skipped_rows"])),
        ("truncated shards", len(report["truncated_shards"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    head = "| source | matched | missing | empty | coverage | variants | synthetic share realized (paper rule) |"
    lines += ["", head, "|---|---|---|---|---|---|---|"]
    for src, c in report["sources"].items():
        shares = ", ".join(
            f"p={p}: {v['paper']:.4f}"
            + ("" if v["effective_draw"] is None else f" (effective draws {v['effective_draw']:.4f})")
            for p, v in c["synthetic_share"].items()
        )
        lines.append(
            f"| {src} | {c['matched']} | {c['missing']} | {c['empty']} | {c['coverage']:.4f} "
            f"| {c['variants_per_caption']:.2f} | {shares} |"
        )
    for name, f in report.get("fields", {}).items():
        lines.append(f"field {name}: {f['values']} values, {f['bad']} not numbers")
    return "\n".join(lines)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_arguments(p)
    p.add_argument("--sidecar-dir", help="write sidecars here (a folder or an fsspec URL) instead of beside the shards")
    p.add_argument("--p", default="0.15,0.5,1.0", help="p values whose realized synthetic share the report shows")
    p.add_argument("--index", help="path of the SQLite caption index (default: hidden file in the sidecar folder)")
    p.add_argument("--keep-index", action="store_true", help="keep the caption index after a successful run")
    p.add_argument("--force", action="store_true", help="redo shards already attached")
    p.add_argument("--workers", type=int, help="processes reading shards ahead (default: up to 4 for 8 shards or more)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern of the shards")
    p.add_argument("--cap-dir", required=True, help="MetaCLIP caption folder ({shard % 100}/{shard}.json)")
    p.add_argument("--name", required=True, help="caption source name for the sidecars, e.g. altogether")
    p.add_argument("--member-field", default="altogether", help="field of captioner-style values")
    p.add_argument("--sidecar-dir", help="write sidecars here instead of beside the shards")
    p.add_argument("--min-coverage", help="fail below this share of samples matched (default: reported only)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")


def import_(args: argparse.Namespace) -> int:
    """``import``: ``attach --format metaclip`` with MetaCLIP's words for the flags."""
    argv = ["--shards", args.shards, "--format", "metaclip", "--captions", args.cap_dir, "--name", args.name]
    argv += ["--member-field", args.member_field]
    for flag, value in (("--sidecar-dir", args.sidecar_dir), ("--min-coverage", args.min_coverage)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [f for f, on in (("--force", args.force), ("--quiet", args.quiet)) if on]
    parser = argparse.ArgumentParser(prog="import")
    add_cli_arguments(parser)
    return attach(parser.parse_args(argv))
