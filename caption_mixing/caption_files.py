"""Read synthetic captions from the files captioners produce: JSONL, Parquet or CSV/TSV.

Records are streamed (never all in memory) as ``(row_number, key, caption)``. Row numbers are
1-based lines for JSONL/CSV (header = line 1) and 1-based rows for Parquet, so errors can point
at the exact place in the file.

Bytes that are not UTF-8 are replaced with U+FFFD, never silently: each such line (or Parquet
row) is reported to the caller through ``bad_utf8`` so ``attach`` can count and name them.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class CaptionFileError(ValueError):
    pass


def detect_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".tsv", "tsv"),
    ):
        if name.endswith(ext):
            return fmt
    raise CaptionFileError(f"{path}: unknown caption file type; expected .jsonl, .parquet, .csv or .tsv")


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _decoded_lines(raw: Iterable[bytes], bad_utf8: list[int] | None) -> Iterator[str]:
    """Lines as text; a line with invalid UTF-8 is decoded with U+FFFD and its number recorded."""
    for line_no, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            if bad_utf8 is not None:
                bad_utf8.append(line_no)
            yield line.decode("utf-8", errors="replace")


def _text(value: object, row: int, bad_utf8: list[int] | None) -> object:
    """Parquet binary cells as text (recorded like a bad line when not UTF-8)."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        if bad_utf8 is not None and (not bad_utf8 or bad_utf8[-1] != row):
            bad_utf8.append(row)
        return value.decode("utf-8", errors="replace")


def _field(record: dict, field: str, path: Path, row: int) -> object:
    if field not in record:
        raise CaptionFileError(f"{path}: row {row} has no field {field!r} (fields: {', '.join(map(str, record))})")
    return record[field]


def iter_captions(
    path: str | Path, key_field: str = "key", caption_field: str = "caption", bad_utf8: list[int] | None = None
) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(row, key, caption)``; a caption may be None or blank (counted as empty by callers).

    Line (or Parquet row) numbers holding bytes that are not UTF-8 are appended to ``bad_utf8``.
    """
    path = Path(path)
    if not path.exists():
        raise CaptionFileError(f"caption file {path} does not exist")
    fmt = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        missing = [f for f in (key_field, caption_field) if f not in pf.schema_arrow.names]
        if missing:
            raise CaptionFileError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(batch_size=65536, columns=[key_field, caption_field]):
            for key, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                row += 1
                yield row, str(_text(key, row, bad_utf8)), _text(caption, row, bad_utf8)
        return
    with _open_binary(path) as raw:
        lines = _decoded_lines(raw, bad_utf8)
        if fmt == "jsonl":
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CaptionFileError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise CaptionFileError(f"{path}: line {line_no} is not a JSON object")
                yield (
                    line_no,
                    str(_field(record, key_field, path, line_no)),
                    _field(record, caption_field, path, line_no),
                )
        else:
            reader = csv.DictReader(lines, delimiter="\t" if fmt == "tsv" else ",")
            for record in reader:
                line_no = reader.line_num
                yield (
                    line_no,
                    str(_field(record, key_field, path, line_no)),
                    _field(record, caption_field, path, line_no),
                )
