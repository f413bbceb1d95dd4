"""A disk-backed index of a caption file (SQLite, from the standard library).

Joining a caption file with ~1,250 (CC-12M) or ~500k (5B corpus) shards must not hold every
caption in memory: the file is streamed once into SQLite, then each shard looks up only its
own keys. Duplicate keys are an error naming the key and both rows, and a file without a single
record is an error saying it is empty. Lines whose bytes are not UTF-8 are indexed (with U+FFFD)
and remembered (``bad_utf8``) so ``attach`` reports them. The index remembers the file's size and
mtime, so a resumed ``attach`` reuses it instead of re-reading the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from caption_mixing.caption_files import CaptionFileError, iter_captions

BATCH = 20000
BAD_LINES_KEPT = 20  # line numbers of bad UTF-8 remembered (all are counted)


class DuplicateKeyError(ValueError):
    pass


def file_fingerprint(path: Path, key_field: str, caption_field: str) -> str:
    """Identifies a caption file's content and fields; a change means the index must be rebuilt."""
    path = Path(path)
    if not path.exists():
        raise CaptionFileError(f"caption file {path} does not exist")
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{key_field}|{caption_field}"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable tar member names
        return False
    return True


class CaptionIndex:
    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.conn = sqlite3.connect(self.db_path)

    @classmethod
    def open_or_build(
        cls, caption_file: str | Path, db_path: str | Path, key_field: str, caption_field: str, progress: bool = True
    ) -> CaptionIndex:
        caption_file, db_path = Path(caption_file), Path(db_path)
        fp = file_fingerprint(caption_file, key_field, caption_field)
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
            index._load(caption_file, key_field, caption_field, progress)
            index.conn.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (fp,))
            index.conn.commit()
        except BaseException:
            index.close()
            tmp.unlink(missing_ok=True)
            raise
        index.close()
        os.replace(tmp, db_path)  # complete indexes only
        return cls(db_path)

    def _load(self, caption_file: Path, key_field: str, caption_field: str, progress: bool) -> None:
        c = self.conn
        c.execute("PRAGMA journal_mode=OFF")
        c.execute("PRAGMA synchronous=OFF")
        c.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        c.execute("CREATE TABLE captions (key TEXT PRIMARY KEY, caption TEXT, row INTEGER) WITHOUT ROWID")
        batch: list[tuple[str, str | None, int]] = []
        bad_utf8: list[int] = []
        records = 0
        bar = tqdm(desc=f"indexing {caption_file.name}", unit=" captions", unit_scale=True, disable=not progress)
        for row, key, caption in iter_captions(caption_file, key_field, caption_field, bad_utf8):
            batch.append((key, caption if caption is None else str(caption), row))
            records += 1
            if len(batch) >= BATCH:
                self._insert(batch, caption_file)
                bar.update(len(batch))
                batch = []
        self._insert(batch, caption_file)
        bar.update(len(batch))
        bar.close()
        if records == 0:
            raise CaptionFileError(f"caption file {caption_file} is empty: it holds no caption records")
        bad = {"count": len(bad_utf8), "lines": bad_utf8[:BAD_LINES_KEPT]}
        c.execute("INSERT INTO meta VALUES ('bad_utf8', ?)", (json.dumps(bad),))

    def _insert(self, batch: list[tuple[str, str | None, int]], caption_file: Path) -> None:
        try:
            with self.conn:
                self.conn.executemany("INSERT INTO captions VALUES (?, ?, ?)", batch)
        except sqlite3.IntegrityError:
            # The batch was rolled back; insert row by row to name the duplicate precisely.
            for key, caption, row in batch:
                try:
                    self.conn.execute("INSERT INTO captions VALUES (?, ?, ?)", (key, caption, row))
                except sqlite3.IntegrityError:
                    first = self.conn.execute("SELECT row FROM captions WHERE key=?", (key,)).fetchone()
                    raise DuplicateKeyError(
                        f"{caption_file}: duplicate key {key!r} on row {row} (first on row {first[0]})"
                    ) from None
            raise

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    @property
    def bad_utf8(self) -> dict:
        """``{"count": lines with bytes that are not UTF-8, "lines": the first of their numbers}``."""
        row = self.conn.execute("SELECT value FROM meta WHERE name='bad_utf8'").fetchone()
        return json.loads(row[0]) if row else {"count": 0, "lines": []}

    def lookup(self, keys: Iterable[str]) -> dict[str, str | None]:
        """Captions for the given keys that are in the index (value may be None or blank)."""
        keys = [k for k in keys if _encodable(k)]  # a key with undecodable bytes matches no caption
        out: dict[str, str | None] = {}
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 900]
            marks = ",".join("?" * len(chunk))
            out.update(self.conn.execute(f"SELECT key, caption FROM captions WHERE key IN ({marks})", chunk))
        return out

    def close(self) -> None:
        self.conn.close()
