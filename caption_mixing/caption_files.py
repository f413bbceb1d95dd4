"""Read caption files as released: JSONL, Parquet, CSV/TSV, JSON dicts and line-aligned text.

Records are streamed, never all in memory, as ``(file_index, row, key, values)``: ``key`` is the
join value (a column, the dict key of a JSON-dict file, or the 0-based row index of line-aligned
text files) and ``values`` holds the requested columns in order. A 23 GB CSV is read row by row,
a Parquet file batch by batch, and a JSON-dict file (VeCap's ``{url: caption}``) entry by entry
with an incremental parser, so memory stays flat whatever the file size.

Row numbers point at the exact place in the file: 1-based lines for JSONL and line-aligned text,
the first line of the record for CSV/TSV (a quoted caption may span lines), 1-based rows for
Parquet and 1-based entries for JSON dicts.

Bad input is named, never silent: a missing column is an error naming the file and the columns it
has; a CSV/TSV row with fewer fields than the header is skipped and reported through ``skipped``
(file, line, the missing field); bytes that are not UTF-8 are replaced with U+FFFD and their line
numbers reported through ``bad_utf8``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import BinaryIO

FORMATS = ("jsonl", "parquet", "csv", "tsv", "json-dict", "lines")
MAX_FIELD = 16 << 20  # a CSV field longer than this is an unterminated quote, not a caption
CHUNK = 1 << 20  # bytes decoded at a time
VALUE = ""  # the column name that means "the value itself" in a JSON-dict file

Record = tuple[int, int, str, tuple]
BadUtf8 = Callable[[int, int], None]  # (file_index, line or row)
Skipped = Callable[[int, int, str], None]  # (file_index, line, why)


class CaptionFileError(ValueError):
    pass


@dataclass(frozen=True)
class Table:
    """What to read: files of one format, the column holding the join value, the value columns."""

    paths: tuple[str, ...]
    fmt: str
    key_field: str | None  # None: the dict key (json-dict) or the row index (lines)
    columns: tuple[str, ...]
    original: str | None = None  # lines: the file of original captions, read in step as a last column

    @property
    def value_columns(self) -> tuple[str, ...]:
        """The values of each record: ``columns``, then the original caption when there is one."""
        return (*self.columns, *(("original",) if self.original else ()))


def detect_format(path: str | Path, key_field: str | None = None) -> str:
    """The format of a caption file by its name (``.json`` is sniffed: JSON lines or one dict)."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".txt", "lines")):
        if name.endswith(ext):
            return fmt
    if name.endswith(".json"):
        return _sniff_json(path, key_field)
    raise CaptionFileError(f"{path}: unknown caption file type; expected .jsonl, .json, .parquet, .csv, .tsv or .txt")


def _sniff_json(path: Path, key_field: str | None) -> str:
    """JSON lines when the first line is a whole object holding ``key_field``; else one JSON dict."""
    if not path.exists():
        raise CaptionFileError(f"caption file {path} does not exist")
    with _open_binary(path) as f:
        first = f.readline(1 << 20)
    try:
        record = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "json-dict"
    return "jsonl" if isinstance(record, dict) and key_field is not None and key_field in record else "json-dict"


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _decoded_lines(raw: BinaryIO, bad: Callable[[int], None] | None) -> Iterator[str]:
    """Lines as text (split on ``\\n`` only); a line with invalid UTF-8 is decoded with U+FFFD and its
    number reported. Blocks of whole lines are decoded at once, line by line only where one fails."""
    line_no = 0
    rest = b""
    while True:
        block = raw.read(CHUNK)
        data = rest + block
        if not data:
            return
        cut = data.rfind(b"\n") + 1 if block else len(data)
        if cut == 0:
            rest = data
            continue
        data, rest = data[:cut], data[cut:]
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = []
            for line in data.split(b"\n"):
                try:
                    lines.append(line.decode("utf-8"))
                except UnicodeDecodeError:
                    if bad is not None:
                        bad(line_no + len(lines) + 1)
                    lines.append(line.decode("utf-8", errors="replace"))
        last = lines.pop()  # "" after a final newline, else the file's unterminated last line
        for line in lines:
            line_no += 1
            yield line + "\n"
        if last:
            line_no += 1
            yield last
        if not block:
            return


def _field(record: dict, field: str, path: Path, row: int) -> object:
    if field not in record:
        raise CaptionFileError(f"{path}: row {row} has no field {field!r} (fields: {', '.join(map(str, record))})")
    return record[field]


def _jsonl(path: Path, t: Table, bad: Callable[[int], None]) -> Iterator[tuple[int, str, tuple]]:
    with _open_binary(path) as raw:
        for line_no, line in enumerate(_decoded_lines(raw, bad), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionFileError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise CaptionFileError(f"{path}: line {line_no} is not a JSON object")
            key = _field(record, t.key_field, path, line_no)
            yield line_no, str(key), tuple(_field(record, c, path, line_no) for c in t.columns)


def _delimited(
    path: Path, t: Table, bad: Callable[[int], None], skipped: Callable[[int, str], None]
) -> Iterator[tuple[int, str, tuple]]:
    """CSV/TSV rows through the csv module: quoted fields may hold commas, tabs and newlines."""
    csv.field_size_limit(MAX_FIELD)
    with _open_binary(path) as raw:
        reader = csv.reader(_decoded_lines(raw, bad), delimiter="\t" if t.fmt == "tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise CaptionFileError(f"{path}: line 1: {e}") from None
        names = [t.key_field, *t.columns]
        missing = [n for n in names if n not in header]
        if missing:
            raise CaptionFileError(
                f"{path}: no column {missing[0]!r} in the header (line 1; columns: {', '.join(header)})"
            )
        at = [header.index(n) for n in names]
        need = max(at) + 1
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise CaptionFileError(f"{path}: line {start}: {e} (an unterminated quote?)") from None
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) < need:
                field = names[next(i for i, a in enumerate(at) if a >= len(row))]
                skipped(line, f"{len(row)} fields, no {field!r}")
                continue
            yield line, row[at[0]], tuple(row[a] for a in at[1:])


def _parquet(path: Path, t: Table, bad: Callable[[int], None]) -> Iterator[tuple[int, str, tuple]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for files that are not Parquet
        raise CaptionFileError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    wanted = list(dict.fromkeys([t.key_field, *t.columns]))
    missing = [f for f in wanted if f not in names]
    if missing:
        raise CaptionFileError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=65536, columns=wanted):
        cols = {name: batch.column(i).to_pylist() for i, name in enumerate(wanted)}
        for i, key in enumerate(cols[t.key_field]):
            row += 1
            values = tuple(_text(cols[c][i], row, bad) for c in t.columns)
            yield row, str(_text(key, row, bad)), values


def _text(value: object, row: int, bad: Callable[[int], None]) -> object:
    """Parquet binary cells as text (reported like a bad line when not UTF-8)."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        bad(row)
        return value.decode("utf-8", errors="replace")


def iter_json_dict(stream: BinaryIO, path: Path, bad: Callable[[int], None]) -> Iterator[tuple[int, str, object]]:
    """``(entry, key, value)`` of a file holding one JSON object, parsed incrementally (any size)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, entry = "", 0, False, 0

    def more() -> None:
        nonlocal buf, pos, eof
        chunk = stream.read(1 << 20)
        eof = not chunk
        try:
            text = utf8.decode(chunk, final=eof)
        except UnicodeDecodeError:
            bad(entry + 1)
            utf8.reset()
            text = chunk.decode("utf-8", errors="replace")
        buf, pos = buf[pos:] + text, 0

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if eof:
                return ""
            more()

    def value(what: str) -> object:
        nonlocal pos
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise CaptionFileError(f"{path}: entry {entry + 1}: {what} is not valid JSON ({e.msg})") from None
                more()
                continue
            if end == len(buf) and not eof:  # a number at the buffer's end may go on in the next block
                more()
                continue
            pos = end
            return obj

    first = skip_space()
    if first != "{":
        kind = {"[": "a list", "": "empty", '"': "a string"}.get(first, f"not an object (starts with {first!r})")
        raise CaptionFileError(f"{path}: expected one JSON object {{key: caption, ...}}; the file is {kind}")
    pos += 1
    if skip_space() == "}":
        return
    while True:
        if skip_space() != '"':
            raise CaptionFileError(f"{path}: entry {entry + 1}: expected a quoted key")
        key = value("key")
        if skip_space() != ":":
            raise CaptionFileError(f"{path}: entry {entry + 1}: expected ':' after key {key!r}")
        pos += 1
        skip_space()
        obj = value(f"value of {key!r}")
        entry += 1
        yield entry, key, obj
        sep = skip_space()
        pos += 1
        if sep == "":
            raise CaptionFileError(f"{path}: the file ends after entry {entry} without a closing brace (cut short?)")
        if sep == "}":
            if skip_space() != "":
                raise CaptionFileError(f"{path}: data after the closing brace of the JSON object")
            return
        if sep != ",":
            raise CaptionFileError(f"{path}: entry {entry}: expected ',' or '}}' after the value of {key!r}")


def _json_dict(path: Path, t: Table, bad: Callable[[int], None]) -> Iterator[tuple[int, str, tuple]]:
    with _open_binary(path) as raw:
        for entry, key, obj in iter_json_dict(raw, path, bad):
            values = []
            for c in t.columns:
                if c == VALUE:
                    values.append(obj)
                elif isinstance(obj, dict):
                    values.append(obj.get(c))
                else:
                    raise CaptionFileError(
                        f"{path}: entry {entry} ({key!r}) is a {type(obj).__name__}, not an object with field {c!r}"
                    )
            yield entry, key, tuple(values)


def _original_captions(path: Path, bad: Callable[[int], None]) -> Iterator[str]:
    """Original captions, one per data row: a .txt line, or a CSV/TSV's ``caption`` column (else its 2nd)."""
    fmt = detect_format(path)
    with _open_binary(path) as raw:
        lines = _decoded_lines(raw, bad)
        if fmt == "lines":
            for line in lines:
                yield line.rstrip("\r\n")
            return
        csv.field_size_limit(MAX_FIELD)
        reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",")
        first = next(reader, None)
        if first is None:
            return
        lowered = [c.strip().lower() for c in first]
        col = lowered.index("caption") if "caption" in lowered else min(1, len(first) - 1)
        if "caption" not in lowered:
            yield first[col] if len(first) > col else ""
        for row in reader:
            yield row[col] if len(row) > col else ""


def _lines(t: Table, bad_for: Callable[[int], Callable[[int], None]]) -> Iterator[Record]:
    """Line-aligned text files read in step: key = 0-based row index, one value per file."""
    paths = [Path(p) for p in t.paths]
    handles = [_open_binary(p) for p in paths]
    try:
        streams: list[Iterator[str]] = [_decoded_lines(h, bad_for(i)) for i, h in enumerate(handles)]
        if t.original:
            streams.append(_original_captions(Path(t.original), bad_for(len(paths))))
        names = [*map(str, paths), *([t.original] if t.original else [])]
        for line_no, row in enumerate(zip_longest(*streams), start=1):
            if any(v is None for v in row):
                short = names[row.index(None)]
                longer = names[next(i for i, v in enumerate(row) if v is not None)]
                raise CaptionFileError(
                    f"{short} ends at line {line_no - 1} but {longer} goes on: line-aligned files must have one "
                    "line per row of the input file"
                )
            yield 0, line_no, str(line_no - 1), tuple(v.rstrip("\r\n") for v in row)
    finally:
        for h in handles:
            h.close()


def iter_records(table: Table, bad_utf8: BadUtf8 | None = None, skipped: Skipped | None = None) -> Iterator[Record]:
    """Yield ``(file_index, row, key, values)`` from every file of ``table`` in order."""
    if table.fmt not in FORMATS:
        raise CaptionFileError(f"unknown caption file format {table.fmt!r}; expected one of {', '.join(FORMATS)}")
    for p in (*table.paths, *([table.original] if table.original else [])):
        if not Path(p).exists():
            raise CaptionFileError(f"caption file {p} does not exist")

    def bad_for(i: int) -> Callable[[int], None]:
        return (lambda row: bad_utf8(i, row)) if bad_utf8 is not None else (lambda row: None)

    if table.fmt == "lines":
        yield from _lines(table, bad_for)
        return
    for i, p in enumerate(table.paths):
        path, bad = Path(p), bad_for(i)
        if table.fmt == "jsonl":
            rows = _jsonl(path, table, bad)
        elif table.fmt == "parquet":
            rows = _parquet(path, table, bad)
        elif table.fmt == "json-dict":
            rows = _json_dict(path, table, bad)
        else:

            def skip(line: int, why: str, i: int = i) -> None:
                if skipped is not None:
                    skipped(i, line, why)

            rows = _delimited(path, table, bad, skip)
        for row, key, values in rows:
            yield i, row, key, values


def iter_captions(
    path: str | Path, key_field: str = "key", caption_field: str = "caption", bad_utf8: list[int] | None = None
) -> Iterator[tuple[int, str, object]]:
    """``(row, key, caption)`` of one caption file (the one-column view of ``iter_records``)."""
    table = Table((str(path),), detect_format(path, key_field), key_field, (caption_field,))
    lines = bad_utf8 if bad_utf8 is not None else []
    for _, row, key, values in iter_records(table, lambda _i, r: lines.append(r)):
        yield row, key, values[0]
