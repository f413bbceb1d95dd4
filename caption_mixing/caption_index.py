"""A disk-backed index of caption files (SQLite, from the standard library).

Joining a caption file with ~1,250 (CC-12M) or ~500k (5B corpus) shards must not hold every
caption in memory: the files are streamed once into SQLite (one row per record: the join value,
where it came from, one cell per requested column), then each shard looks up only its own
samples. SQLite's page cache is capped, so memory stays flat for any file size.

Duplicate join values follow a rule (``DUPLICATE_RULES``) and are counted either way:
``error`` stops naming the value and both rows (the default for sample keys, which must be
unique); ``first`` keeps the first record (the default for URLs, hashes and uids, which
releases repeat); ``drop`` keeps none of a value whose records disagree. Identical repeats are
harmless and only counted. A file without a single record is an error saying it is empty.

For URL joins the index also maps each URL's normalized spelling (``joins.normalize_url``) to it,
so a lookup that misses on the raw URL retries the normalized one. Bytes that are not UTF-8 are
indexed (with U+FFFD) and remembered (``bad_utf8``) so ``attach`` reports them. The index keeps a
fingerprint of the files and settings, so a resumed ``attach`` reuses it instead of re-reading.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from caption_mixing.caption_files import CaptionFileError, Table, detect_format, iter_records
from caption_mixing.joins import normalize_url

BATCH = 100_000  # records inserted at a time, sorted by key: each b-tree page is touched once per batch
BATCH_BYTES = 24 << 20  # ... or fewer when the captions are long (memory stays bounded)
KEPT = 20  # examples of bad lines, skipped rows and duplicates remembered (all are counted)
DUPLICATE_RULES = ("error", "first", "drop")
LIST_MARK = "\x00"  # a cell holding a JSON list or object (variants) starts with NUL, which no caption does


class DuplicateKeyError(ValueError):
    pass


def _fingerprint_part(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise CaptionFileError(f"caption file {p} does not exist")
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def table_fingerprint(table: Table, normalize: bool, duplicates: str) -> str:
    """Identifies the files' content and what is read from them; a change means a rebuild."""
    files = [_fingerprint_part(p) for p in (*table.paths, *([table.original] if table.original else []))]
    return json.dumps([files, table.fmt, table.key_field, table.columns, normalize, duplicates])


def file_fingerprint(path: Path, key_field: str, caption_field: str) -> str:
    """The fingerprint of one caption file read for one column (kept for callers of the one-file form)."""
    table = Table((str(path),), detect_format(path, key_field), key_field, (caption_field,))
    return table_fingerprint(table, False, "error")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable tar member names
        return False
    return True


def to_cell(value: object) -> object:
    """A caption-file value as an SQLite cell (lists and objects as marked JSON, NaN as NULL)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if isinstance(value, (list, tuple, dict)):
        return LIST_MARK + json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def from_cell(cell: object) -> object:
    if isinstance(cell, str) and cell.startswith(LIST_MARK):
        return json.loads(cell[1:])
    return cell


class _Problems:
    """Counts and first examples of bad UTF-8, skipped rows and duplicates while indexing."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.bad: dict[str, list] = {}
        self.bad_count = 0
        self.skipped: list[str] = []
        self.skipped_count = 0
        self.dup = {"rows": 0, "identical": 0, "conflicting": 0, "dropped_keys": 0, "examples": []}
        self.norm_collisions = 0

    def bad_utf8(self, i: int, row: int) -> None:
        self.bad_count += 1
        lines = self.bad.setdefault(self.paths[i], [0, []])
        lines[0] += 1
        if len(lines[1]) < KEPT and (not lines[1] or lines[1][-1] != row):
            lines[1].append(row)

    def skip(self, i: int, line: int, why: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < KEPT:
            self.skipped.append(f"{self.paths[i]}: line {line} ({why})")


class CaptionIndex:
    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.conn = sqlite3.connect(self.db_path)
        self.conn.execute("PRAGMA cache_size=-32768")  # 32 MiB of pages at most: memory stays flat
        self._meta: dict[str, object] | None = None
        self._len: int | None = None
        self._lists: bool | None = None
        self._width: int | None = None

    @classmethod
    def open_or_build(
        cls,
        caption_file: str | Path | None,
        db_path: str | Path,
        key_field: str = "key",
        caption_field: str = "caption",
        progress: bool = True,
        *,
        table: Table | None = None,
        normalize: bool = False,
        duplicates: str = "error",
    ) -> CaptionIndex:
        """Reuse the index at ``db_path`` if it was built from the same files and settings, else build it.

        ``table`` says what to read; without it, one file's ``key_field`` and ``caption_field``.
        """
        if duplicates not in DUPLICATE_RULES:
            raise ValueError(f"--duplicates: {duplicates!r} is not one of {', '.join(DUPLICATE_RULES)}")
        if table is None:
            if not Path(caption_file).exists():
                raise CaptionFileError(f"caption file {caption_file} does not exist")
            table = Table((str(caption_file),), detect_format(caption_file, key_field), key_field, (caption_field,))
        db_path = Path(db_path)
        fp = table_fingerprint(table, normalize, duplicates)
        if db_path.exists():
            index = cls(db_path)
            try:
                row = index.conn.execute("SELECT value FROM meta WHERE name='fingerprint'").fetchone()
            except sqlite3.DatabaseError:
                row = None
            if row and row[0] == fp:
                return index
            index.close()
            db_path.unlink()
        tmp = db_path.with_name(db_path.name + ".building")
        tmp.unlink(missing_ok=True)
        index = cls(tmp)
        try:
            index._load(table, normalize, duplicates, progress)
            index.conn.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (fp,))
            index.conn.commit()
        except BaseException:
            index.close()
            tmp.unlink(missing_ok=True)
            raise
        index.close()
        os.replace(tmp, db_path)  # complete indexes only
        return cls(db_path)

    def _load(self, table: Table, normalize: bool, duplicates: str, progress: bool) -> None:
        c = self.conn
        c.execute("PRAGMA page_size=16384")  # records are stored in the key's b-tree: room for long captions
        c.execute("PRAGMA journal_mode=OFF")
        c.execute("PRAGMA synchronous=OFF")
        c.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        cells = ", ".join(f"c{i}" for i in range(len(table.value_columns)))
        table_sql = f"CREATE TABLE captions (key TEXT PRIMARY KEY, file INTEGER, row INTEGER, {cells}) WITHOUT ROWID"
        c.execute(table_sql)  # one b-tree probe per lookup (a rowid table with a key index takes two)
        c.execute("CREATE TABLE norm (nkey TEXT PRIMARY KEY, key TEXT) WITHOUT ROWID")
        c.execute("CREATE TABLE dropped (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self.table, self.normalize, self.duplicates = table, normalize, duplicates
        self.problems = _Problems(list(table.paths) + ([table.original] if table.original else []))
        marks = ", ".join("?" * (3 + len(table.value_columns)))
        self.insert = f"INSERT{' OR IGNORE' if duplicates != 'error' else ''} INTO captions VALUES ({marks})"
        batch: list[tuple] = []
        records = size = 0
        lists = False  # any cell holding a list (variants): lookups decode cells only then
        desc = f"indexing {Path(table.paths[0]).name}" + (f" (+{len(table.paths) - 1})" if len(table.paths) > 1 else "")
        bar = tqdm(desc=desc, unit=" records", unit_scale=True, disable=not progress)
        for i, row, key, values in iter_records(table, self.problems.bad_utf8, self.problems.skip):
            cells = tuple(map(to_cell, values))
            batch.append((key, i, row, *cells))
            lists = lists or any(isinstance(c, str) and c.startswith(LIST_MARK) for c in cells)
            records += 1
            size += len(key) + sum(len(c) for c in cells if isinstance(c, str))
            if len(batch) >= BATCH or size >= BATCH_BYTES:
                self._insert(batch)
                bar.update(len(batch))
                batch, size = [], 0
        self._insert(batch)
        bar.update(len(batch))
        bar.close()
        if records == 0:
            where = " and ".join(table.paths)
            raise CaptionFileError(f"caption file {where} is empty: it holds no caption records")
        with c:
            dropped = c.execute("DELETE FROM captions WHERE key IN (SELECT key FROM dropped)").rowcount
            c.execute("DELETE FROM norm WHERE key IN (SELECT key FROM dropped)")
        p = self.problems
        p.dup["dropped_keys"] = dropped
        meta = {
            "files": p.paths,
            "columns": list(table.columns),
            "normalize": normalize,
            "bad_utf8": {"count": p.bad_count, "files": p.bad},
            "skipped_rows": {"count": p.skipped_count, "examples": p.skipped},
            "duplicates": {"rule": duplicates, **p.dup},
            "normalized_collisions": p.norm_collisions,
            "records": records,
            "lists": lists,
        }
        c.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])

    def _where(self, file: int, row: int) -> str:
        return f"row {row}" if len(self.problems.paths) == 1 else f"row {row} of {self.problems.paths[file]}"

    def _insert(self, batch: list[tuple]) -> None:
        if not batch:
            return
        batch.sort(key=lambda r: r[0])  # stable: a repeated key's records stay in file order (first wins)
        try:
            with self.conn:
                inserted = self.conn.executemany(self.insert, batch).rowcount
        except sqlite3.IntegrityError:
            inserted = None  # rule "error": the batch was rolled back; find the first duplicate
        if inserted is None:
            for key, file, row, *_ in batch:
                first = self.conn.execute("SELECT file, row FROM captions WHERE key=?", (key,)).fetchone()
                if first is not None and tuple(first) == (file, row):
                    continue  # kept from the failed batch (no journal, so no rollback)
                if first is not None:
                    raise DuplicateKeyError(
                        f"{self.problems.paths[file]}: duplicate key {key!r} on row {row} "
                        f"(first on {self._where(*first)})"
                    )
                self.conn.execute(self.insert, (key, file, row, *_))
            raise DuplicateKeyError("duplicate key in the caption file")  # not reached: a duplicate was there
        if inserted < len(batch):
            self._duplicates(batch)
        if self.normalize:
            self._normalized(batch)

    def _duplicates(self, batch: list[tuple]) -> None:
        """Count the records of ``batch`` that repeat a key kept earlier, and apply the rule."""
        dup = self.problems.dup
        for key, file, row, *values in batch:
            kept = self.conn.execute("SELECT * FROM captions WHERE key=?", (key,)).fetchone()
            if kept is None or (kept[1], kept[2]) == (file, row):
                continue
            dup["rows"] += 1
            if list(kept[3:]) == values:
                dup["identical"] += 1
                continue
            dup["conflicting"] += 1
            if len(dup["examples"]) < KEPT:
                dup["examples"].append(f"{key!r}: {self._where(kept[1], kept[2])} and {self._where(file, row)}")
            if self.duplicates == "drop":
                self.conn.execute("INSERT OR IGNORE INTO dropped VALUES (?)", (key,))
        self.conn.commit()

    def _normalized(self, batch: list[tuple]) -> None:
        pairs = []
        for key, *_ in batch:
            nkey = normalize_url(key)
            if nkey != key:
                pairs.append((nkey, key))
        if pairs:
            pairs.sort()
            with self.conn:
                added = self.conn.executemany("INSERT OR IGNORE INTO norm VALUES (?, ?)", pairs).rowcount
            self.problems.norm_collisions += len(pairs) - added

    def meta(self, name: str, default: object = None) -> object:
        if self._meta is None:
            self._meta = {k: json.loads(v) for k, v in self.conn.execute("SELECT name, value FROM meta")}
        return self._meta.get(name, default)

    @property
    def width(self) -> int:
        """Value cells per record."""
        if self._width is None:
            self._width = len(self.conn.execute("SELECT * FROM captions LIMIT 0").description) - 3
        return self._width

    def __len__(self) -> int:
        """Records in the index (counted once: a count is a full scan, and the index does not change)."""
        if self._len is None:
            self._len = self.conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
        return self._len

    @property
    def bad_utf8(self) -> dict:
        """``{"count": lines with bytes that are not UTF-8, "files": {file: [count, first line numbers]}}``."""
        return self.meta("bad_utf8", {"count": 0, "files": {}})

    def _values(self, cells: tuple) -> tuple:
        """The value cells of a ``captions`` row, lists decoded (when the index holds any)."""
        if self._lists is None:
            self._lists = bool(self.meta("lists", True))
        return tuple(from_cell(c) for c in cells) if self._lists else cells

    def _select(self, sql: str, keys: list[str]) -> Iterable[tuple]:
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 900]
            try:
                rows = self.conn.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
            except UnicodeEncodeError:  # a tar name with bytes that are not UTF-8 matches nothing
                chunk = [k for k in chunk if _encodable(k)]
                rows = self.conn.execute(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
            yield from rows

    def lookup(self, keys: Iterable[str], normalize: bool = False) -> dict[str, tuple[str, tuple]]:
        """``join value -> (the file's key it matched, values)`` for the values found.

        With ``normalize``, values that miss are retried by their normalized URL.
        """
        wanted = list(dict.fromkeys(keys))
        out: dict[str, tuple[str, tuple]] = {}
        cells = ", ".join(f"c{i}" for i in range(self.width))
        for row in self._select(f"SELECT key, {cells} FROM captions WHERE key IN ({{marks}})", wanted):
            out[row[0]] = (row[0], self._values(row[1:]))
        if not normalize:
            return out
        missing: dict[str, list[str]] = {}
        for k in wanted:
            if k not in out:
                nk = normalize_url(k)
                missing.setdefault(nk, []).append(k)
        found: dict[str, tuple[str, tuple]] = {}
        nkeys = list(missing)
        for row in self._select(f"SELECT key, {cells} FROM captions WHERE key IN ({{marks}})", nkeys):
            found[row[0]] = (row[0], self._values(row[1:]))
        rest = [n for n in nkeys if n not in found]
        joined = ", ".join(f"c.c{i}" for i in range(self.width))
        sql = f"SELECT n.nkey, c.key, {joined} FROM norm n JOIN captions c ON c.key = n.key WHERE n.nkey IN ({{marks}})"
        for row in self._select(sql, rest):
            found[row[0]] = (row[1], self._values(row[2:]))
        for nk, originals in missing.items():
            if nk in found:
                for k in originals:
                    out[k] = found[nk]
        return out

    def close(self) -> None:
        self.conn.close()
