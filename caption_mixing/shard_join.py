"""One shard joined to caption sources: the per-shard half of ``attach``, run in any process.

``ShardJoiner`` reads a shard (``shards.scan_shard``), finds each sample's caption record (a
lookup in the caption index by key, URL, hash, uid or row; a member or json field of the shard; a
MetaCLIP per-shard file), checks row joins against the original captions, and returns the
per-source captions, numeric fields and counts. It holds no open file between calls, so
``join_shards`` can run it in reader processes that each open the index read-only, while the
calling process records keys and writes sidecars: ``attach`` scales with cores.

Warnings are collected, not printed, and travel with the result, so the calling process prints
them in shard order under one limit per kind.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from caption_mixing.caption_index import CaptionIndex
from caption_mixing.joins import IMAGE_EXTS, join_value, row_of_key, same_text
from caption_mixing.releases import AttachPlan
from caption_mixing.shards import UNREADABLE_TAR, ShardReadError, scan_shard

EXAMPLES = 5  # row-check examples kept per shard (the report keeps the first few overall)
LOOKUP_CACHE_KIB = 64 << 10  # SQLite pages kept by a joiner: lookups are random, so more hit with more
Warn = Callable[[str, str], None]


class AttachError(ValueError):
    """A data problem that stops ``attach`` before any sidecar is replaced."""


def read_shard(
    shard: str, want: tuple[str, ...], warn: Warn, hashed: tuple[str, ...] = ()
) -> tuple[dict[str, dict[str, bytes]], dict | None]:
    """Keys of a shard (in order) with the bytes of the members whose extension is in ``want``
    (and ``__sha256__`` of the first member in ``hashed``).

    A shard that is not a readable tar is an ``AttachError``; a truncated one is a warning, and its
    complete samples are returned with the problem (shard, offset, key cut) as a dict.
    """
    problem = None
    try:
        samples = scan_shard(shard, want, hashed)
    except ShardReadError as e:
        if e.kind == UNREADABLE_TAR:
            raise AttachError(str(e)) from None
        warn("truncated_tar", str(e))
        samples, problem = getattr(e, "samples_read", []), e.as_dict()
    out: dict[str, dict[str, bytes]] = {}
    for sample in samples:
        key = sample.pop("__key__")
        if key in out:
            raise AttachError(f"sample key {key!r} appears twice in shard {shard}; sample keys must be unique")
        del sample["__url__"]
        out[key] = sample
    return out, problem


def _text(raw: bytes, shard: str, key: str, what: str, warn: Warn, result: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        result["bad_utf8"] += 1
        warn("bad_utf8", f"{what} of sample {key!r} in shard {shard} is not UTF-8 ({e.reason}); bytes replaced")
        return raw.decode("utf-8", errors="replace")


def _json(entry: dict[str, bytes], ext: str, shard: str, key: str, warn: Warn, result: dict) -> object:
    """A JSON member of the sample; unparsable JSON is a warning and counts as absent."""
    if ext not in entry:
        return None
    try:
        return json.loads(_text(entry[ext], shard, key, ext, warn, result))
    except json.JSONDecodeError as e:
        warn("bad_json", f"{key}.{ext} in shard {shard} is not valid JSON ({e.msg}); the sample has no caption")
        return None


def _meta(entry: dict[str, bytes], shard: str, key: str, warn: Warn, result: dict) -> dict:
    doc = _json(entry, "json", shard, key, warn, result)
    return doc if isinstance(doc, dict) else {}


def variants(values: Iterable[object]) -> list[str]:
    """The usable captions among a record's cells (strings or lists of strings), blanks and repeats dropped."""
    out: list[str] = []
    for value in values:
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for item in items:
            if isinstance(item, str) and item.strip() and item not in out:
                out.append(item)
    return out


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def new_entry(plan: AttachPlan, samples: int = 0) -> dict:
    """Per-shard counts: shared ones, per source and per numeric field."""
    return {
        "samples": samples,
        "bad_utf8": 0,
        "no_join_value": 0,
        "normalized": 0,
        "row_checked": 0,
        "row_mismatch": 0,
        "sources": {s: {"matched": 0, "missing": 0, "empty": 0, "variants": 0} for s in plan.source_names},
        "fields": {f: {"values": 0, "bad": 0} for f, _ in plan.fields},
    }


def add_entries(total: dict, entry: dict) -> None:
    for k, v in entry.items():
        if isinstance(v, dict):
            add_entries(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v


class ShardJoiner:
    """Joins one shard at a time to the plan's caption sources (picklable: opens the index lazily)."""

    def __init__(self, plan: AttachPlan, index_path: Path | None) -> None:
        self.plan, self.index_path = plan, index_path
        self._index: CaptionIndex | None = None

    def __getstate__(self) -> dict:
        return {"plan": self.plan, "index_path": self.index_path, "_index": None}

    @property
    def index(self) -> CaptionIndex:
        if self._index is None:
            self._index = CaptionIndex(self.index_path)
            self._index.conn.execute(f"PRAGMA cache_size=-{LOOKUP_CACHE_KIB}")
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def want(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(members to read, members to hash) for the plan's join and provider."""
        plan = self.plan
        want: set[str] = set()
        if plan.join in ("url", "uid", "sha256") or plan.provider == "json-field":
            want.add("json")
        if plan.checks_rows:
            want.update({"txt", "json"})
        if plan.provider == "member":
            want.add(plan.member)
        return tuple(sorted(want)), IMAGE_EXTS if plan.join == "sha256" else ()

    def __call__(self, shard: str) -> dict:
        """Everything ``attach`` needs of one shard: keys, counts, captions per source, fields, the
        records matched and the values joined on, the warnings raised and row-check examples."""
        warnings: list[tuple[str, str]] = []

        def warn(kind: str, message: str) -> None:
            warnings.append((kind, message))

        want, hashed = self.want()
        members, truncated = read_shard(shard, want, warn, hashed)
        self.row_examples: list[str] = []
        result, captions, fields, found, joined = self.build(shard, members, warn)
        return {
            "keys": list(members),
            "result": {**result, "truncated": truncated},
            "captions": captions,
            "fields": fields,
            "found": found,
            "joined": joined,
            "warnings": warnings,
            "row_examples": self.row_examples,
        }

    def _from_index(self, shard: str, members: dict, result: dict, warn: Warn) -> tuple[dict, dict, dict]:
        """(sample key -> record values, -> the file key it matched, -> the value it was joined on)."""
        plan, joined = self.plan, {}
        for key, entry in members.items():
            if plan.join == "row":
                row = row_of_key(key, plan.rows_per_shard)
                value = None if row is None else str(row)
            elif plan.join == "key":
                value = key
            else:
                meta = _meta(entry, shard, key, warn, result)
                value = join_value(plan.join, key, meta, entry.get("__sha256__"), plan.shard_field)
            if value is None:
                result["no_join_value"] += 1
            else:
                joined[key] = value
        hits = self.index.lookup(joined.values(), normalize=plan.join == "url")
        values, found = {}, {}
        for key, value in joined.items():
            if value in hits:
                found[key], values[key] = hits[value]
                result["normalized"] += found[key] != value
        if plan.checks_rows:
            self._check_rows(shard, members, values, found, result, warn)
        return values, found, joined if plan.join in ("url", "sha256", "uid") else {}

    def _check_rows(self, shard: str, members: dict, values: dict, found: dict, result: dict, warn: Warn) -> None:
        """A row join is right only where the row's original caption is the sample's alt-text."""
        for key in list(values):
            entry = members[key]
            if "txt" in entry:
                alt = _text(entry["txt"], shard, key, "txt", warn, result)
            else:
                alt = _meta(entry, shard, key, warn, result).get("caption")
            original = values[key][-1]  # the original-caption file is read as the last column
            result["row_checked"] += 1
            if not same_text(original, alt if isinstance(alt, str) else None):
                result["row_mismatch"] += 1
                if len(self.row_examples) < EXAMPLES:
                    self.row_examples.append(
                        f"sample {key!r} of {shard} is row {found[key]}, whose original caption is {original!r}, "
                        f"but its alt-text is {alt!r}"
                    )
                del values[key], found[key]

    def _from_shard(self, shard: str, members: dict, result: dict, warn: Warn) -> dict:
        """Captions inside the shard: a member, a field of ``{key}.json``, or a field of a JSON member."""
        plan, out = self.plan, {}
        for key, entry in members.items():
            if plan.provider == "json-field":
                meta = _meta(entry, shard, key, warn, result)
                if plan.member in meta:
                    out[key] = (meta[plan.member],)
            elif plan.member not in entry:
                continue
            elif plan.member.endswith("json"):
                doc = _json(entry, plan.member, shard, key, warn, result)
                if isinstance(doc, dict) and plan.member_field:
                    doc = doc.get(plan.member_field)
                out[key] = (doc,)
            else:
                out[key] = (_text(entry[plan.member], shard, key, plan.member, warn, result),)
        return out

    def _from_metaclip(self, shard: str, members: dict, result: dict, warn: Warn) -> dict:
        from caption_mixing.metaclip import MetaclipLayoutError, read_shard_captions

        try:
            table = read_shard_captions(self.plan.cap_dir, shard, warn)
        except MetaclipLayoutError as e:
            raise AttachError(str(e)) from None
        out = {}
        for key in members:
            if key in table:
                value = table[key]
                out[key] = (value.get(self.plan.member_field) if isinstance(value, dict) else value,)
        result["extra_records"] = len(table) - len(out)
        return out

    def build(self, shard: str, members: dict, warn: Warn) -> tuple[dict, dict, dict, dict, dict]:
        """(counts, per-source captions, numeric fields, matched file keys, join values) of one shard."""
        plan = self.plan
        result = new_entry(plan, len(members))
        found: dict = {}
        joined: dict = {}
        if plan.provider == "index":
            values, found, joined = self._from_index(shard, members, result, warn)
        elif plan.provider == "metaclip":
            values = self._from_metaclip(shard, members, result, warn)
        else:
            values = self._from_shard(shard, members, result, warn)
        captions: dict[str, dict] = {src: {} for src in plan.source_names}
        fields: dict[str, dict] = {f: {} for f, _ in plan.fields}
        for key in members:
            record = values.get(key)
            for src, columns in plan.sources:
                counts = result["sources"][src]
                if record is None:
                    got = []
                elif len(columns) == 1 and isinstance(record[columns[0]], str):  # the common case, fast
                    got = [record[columns[0]]] if record[columns[0]].strip() else []
                else:
                    got = variants(record[i] for i in columns)
                if got:
                    counts["matched"] += 1
                    counts["variants"] += len(got)
                    captions[src][key] = got[0] if len(got) == 1 else got
                else:
                    counts["missing" if record is None else "empty"] += 1
            for name, i in plan.fields if record is not None else ():
                number = _number(record[i])
                if number is not None:
                    fields[name][key] = number
                    result["fields"][name]["values"] += 1
                elif record[i] not in (None, ""):
                    result["fields"][name]["bad"] += 1
        return result, captions, fields, found, joined


_WORKER: ShardJoiner | None = None  # the joiner of a reader process, set once by its initializer


def _init_worker(joiner: ShardJoiner) -> None:
    global _WORKER
    _WORKER = joiner


def _run(shard: str) -> tuple[dict | None, str | None]:  # in a reader process
    """The process's joiner on one shard; a data error comes back as a message (not every exception pickles)."""
    try:
        return _WORKER(shard), None
    except AttachError as e:
        return None, str(e)


def join_shards(shards: list[str], joiner: ShardJoiner, workers: int) -> Iterator[dict]:
    """``joiner(shard)`` for each shard, in order; with ``workers`` processes working ahead (at most
    two shards each, so memory stays bounded whatever the consumer's pace). Each process opens the
    caption index once. An ``AttachError`` in a worker is raised here, at its shard."""
    if workers <= 0:
        for shard in shards:
            yield joiner(shard)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(joiner,))
    try:
        todo, window = iter(shards), deque()
        for shard in itertools.islice(todo, 2 * workers):
            window.append(pool.apply_async(_run, (shard,)))
        while window:
            out, error = window.popleft().get()
            if error is not None:
                raise AttachError(error)
            for shard in itertools.islice(todo, 1):
                window.append(pool.apply_async(_run, (shard,)))
            yield out
    finally:
        pool.terminate()
        pool.join()
