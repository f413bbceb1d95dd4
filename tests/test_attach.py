"""Synthetic-caption ingestion: caption files and in-shard captions to per-shard sidecars."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caption_mixing import attach as attach_mod
from caption_mixing import shard_join, storage
from caption_mixing.__main__ import main as cli
from caption_mixing.caption_index import CaptionIndex, DuplicateKeyError
from caption_mixing.sidecar import SidecarError, read_sidecar, sidecar_path
from tests.conftest import jpeg_bytes, make_shards


def _records(keys: list[str]) -> list[dict]:
    return [{"key": k, "url": f"https://img.example/{k}.jpg", "caption": f"dense caption {k}"} for k in keys]


def _write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    return path


def _sidecars(pattern_dir: Path, name: str) -> dict[str, str]:
    out = {}
    for shard in sorted(pattern_dir.glob("*.tar")):
        out.update(read_sidecar(sidecar_path(shard, name), shard=shard))
    return out


def _sidecars_in(folder: Path, name: str) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob(f"*.{name}.json")):
        out.update(read_sidecar(path))
    return out


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_attach_from_caption_files(tmp_path: Path, suffix: str, capsys) -> None:
    pattern, keys = make_shards(tmp_path / "s", n_shards=3, per_shard=10, source="unused")
    records = _records(keys[:-3]) + [{"key": "not-in-shards", "url": "u", "caption": "x"}]
    records[0]["caption"] = "   "  # blank counts as empty, not as a caption
    captions = _write(tmp_path / f"caps{suffix}", records)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s").glob("*.tar")}

    assert cli(["attach", "--shards", pattern, "--captions", str(captions), "--name", "r3", "--quiet"]) == 1
    assert "below --min-coverage" in capsys.readouterr().out
    rc = cli(
        ["attach", "--shards", pattern, "--captions", str(captions), "--name", "r3", "--quiet", "--min-coverage", "0.8"]
    )
    assert rc == 0
    got = _sidecars(tmp_path / "s", "r3")
    assert got == {k: f"dense caption {k}" for k in keys[1:-3]}
    report = json.loads((tmp_path / "s" / "r3.attach.json").read_text())
    assert (report["samples"], report["matched"], report["missing"], report["empty"]) == (30, 26, 3, 1)
    assert report["extra_keys"] == 1 and report["complete"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digests} == digests  # shards untouched
    assert not list((tmp_path / "s").glob(".r3.captions.sqlite*"))  # index removed after success


def _digests(folder: Path, pattern: str = "*.json") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def test_attach_killed_while_staging_resumes_without_rereading_done_shards(tmp_path: Path, monkeypatch) -> None:
    pattern, keys = make_shards(tmp_path / "s", n_shards=3, per_shard=5, source="unused")
    caps = _write(tmp_path / "c.jsonl", _records(keys))
    side = tmp_path / "side"
    args = [
        "attach",
        "--shards",
        pattern,
        "--captions",
        str(caps),
        "--name",
        "r3",
        "--quiet",
        "--sidecar-dir",
        str(side),
    ]
    monkeypatch.setattr(attach_mod, "SAVE_EVERY_S", 0.0)
    real_write, real_read = attach_mod.write_sidecar, shard_join.read_shard

    def killed_on_second(path, *a, **kw):
        if len(list(side.glob(".*.staged"))) == 1:
            raise KeyboardInterrupt  # as if killed while shard 00001 was being written
        return real_write(path, *a, **kw)

    monkeypatch.setattr(attach_mod, "write_sidecar", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        cli(args)
    assert not list(side.glob("*.r3.json"))  # nothing installed before the checks
    assert [p.name for p in side.glob(".*.staged")] == [".00000.r3.json.staged"]

    read = []
    monkeypatch.setattr(attach_mod, "write_sidecar", real_write)
    monkeypatch.setattr(
        shard_join, "read_shard", lambda shard, *a: read.append(Path(shard).name) or real_read(shard, *a)
    )
    assert cli(args) == 0
    assert read == ["00001.tar", "00002.tar"]  # the staged shard was not read again
    assert _sidecars_in(side, "r3") == {k: f"dense caption {k}" for k in keys}
    report = json.loads((side / "r3.attach.json").read_text())
    assert (report["state"], report["matched"], report["extra_keys"], report["complete"]) == ("installed", 15, 0, True)
    assert not list(side.glob(".*")), "staged files, temp files and the key list are gone"
    read.clear()
    assert cli(args) == 0 and read == []  # a finished attach is not redone


def test_attach_killed_while_renaming_is_finished_by_the_rerun(tmp_path: Path, monkeypatch) -> None:
    pattern, keys = make_shards(tmp_path / "s", n_shards=3, per_shard=4, source="unused")
    old = _write(tmp_path / "old.jsonl", [{"key": k, "caption": f"old {k}"} for k in keys])
    new = _write(tmp_path / "new.jsonl", [{"key": k, "caption": f"new {k}"} for k in keys])
    base = ["attach", "--shards", pattern, "--name", "syn", "--quiet"]
    assert cli([*base, "--captions", str(old)]) == 0
    real_replace, renamed = os.replace, []

    def killed_after_first(src, dst):
        if str(src).endswith(".staged"):  # an install rename (atomic writes use os.replace too)
            if renamed:
                raise KeyboardInterrupt
            renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        cli([*base, "--captions", str(new)])
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert {c.split()[0] for c in _sidecars_in(tmp_path / "s", "syn").values()} == {"old", "new"}  # half renamed
    assert cli([*base, "--captions", str(new)]) == 0
    assert _sidecars_in(tmp_path / "s", "syn") == {k: f"new {k}" for k in keys}


def test_join_on_url(tmp_path: Path) -> None:
    shards = tmp_path / "s"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(4):
            key = f"{i:09d}"
            for ext, data in (
                ("jpg", jpeg_bytes((1, 2, 3))),
                ("txt", b"alt"),
                ("json", json.dumps({"url": f"https://x/{i}"}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    caps = _write(tmp_path / "c.jsonl", [{"url": f"https://x/{i}", "text": f"syn {i}"} for i in range(4)])
    rc = cli(
        [
            "attach",
            "--shards",
            str(shards / "00000.tar"),
            "--captions",
            str(caps),
            "--name",
            "r2",
            "--key-field",
            "url",
            "--caption-field",
            "text",
            "--join-on",
            "url",
            "--quiet",
        ]
    )
    assert rc == 0
    assert read_sidecar(shards / "00000.r2.json") == {f"{i:09d}": f"syn {i}" for i in range(4)}


def test_captions_inside_shards(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            key = f"{i:09d}"
            members = {
                "jpg": jpeg_bytes((9, 9, 9)),
                "txt": b"alt",
                "altogether.txt": f"member {i}".encode(),
                "json": json.dumps({"recaption": f"field {i}"}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert cli(["attach", "--shards", str(shard), "--from-member", "altogether.txt", "--name", "a", "--quiet"]) == 0
    assert cli(["attach", "--shards", str(shard), "--from-json-field", "recaption", "--name", "b", "--quiet"]) == 0
    assert read_sidecar(tmp_path / "00000.a.json")["000000001"] == "member 1"
    assert read_sidecar(tmp_path / "00000.b.json")["000000002"] == "field 2"


def test_duplicate_key_names_key_and_line(tmp_path: Path) -> None:
    caps = tmp_path / "c.jsonl"
    caps.write_text('{"key": "a", "caption": "x"}\n{"key": "b", "caption": "y"}\n{"key": "a", "caption": "z"}\n')
    with pytest.raises(DuplicateKeyError, match=r"duplicate key 'a' on row 3 \(first on row 1\)"):
        CaptionIndex.open_or_build(caps, tmp_path / "i.sqlite", "key", "caption", progress=False)
    assert not (tmp_path / "i.sqlite").exists()


def test_missing_field_and_bad_json_name_the_file(tmp_path: Path) -> None:
    caps = tmp_path / "c.jsonl"
    caps.write_text('{"key": "a", "text": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl: row 1 has no field 'caption'"):
        CaptionIndex.open_or_build(caps, tmp_path / "i.sqlite", "key", "caption", progress=False)
    caps.write_text('{"key": "a", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="c.jsonl: line 2 is not valid JSON"):
        CaptionIndex.open_or_build(caps, tmp_path / "j.sqlite", "key", "caption", progress=False)


def test_sidecar_written_for_another_shard_is_refused(tmp_path: Path) -> None:
    pattern, _ = make_shards(tmp_path, n_shards=2, per_shard=3)
    (tmp_path / "00000.altogether.json").write_bytes((tmp_path / "00001.altogether.json").read_bytes())
    with pytest.raises(SidecarError, match="written for shard '00001.tar', not '00000.tar'"):
        read_sidecar(tmp_path / "00000.altogether.json", shard=tmp_path / "00000.tar")


def _scan_both(url: str, want: tuple[str, ...]) -> tuple[list, list]:
    """attach's reader and the training reader on one shard: samples, then (kind, offset, key, samples) on damage."""
    from caption_mixing.shards import ShardReadError, read_tar_samples, scan_shard

    try:
        fast = (scan_shard(url, want), None)
    except ShardReadError as e:
        fast = (e.samples_read, (e.kind, e.offset, e.key, e.samples))
    samples: list[dict] = []
    try:
        samples.extend(read_tar_samples(url, want))
        slow = (samples, None)
    except ShardReadError as e:
        slow = (samples, (e.kind, e.offset, e.key, e.samples))
    return fast, slow


@pytest.mark.parametrize(
    "layout", ["ustar", "gnu_long_names", "pax", "gzip", "cut_in_data", "cut_at_header", "garbage"]
)
def test_attach_reader_matches_the_training_reader(tmp_path: Path, layout: str) -> None:
    """``scan_shard`` parses headers itself and seeks past unwanted data; on every layout (and damage)
    it yields what ``iter_tar_samples`` does, falling back to tarfile for the headers it does not parse."""
    import gzip

    names = [f"{'sub/' * 40 if layout == 'gnu_long_names' else ''}{i:04d}" for i in range(5)]
    fmt = {"gnu_long_names": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}.get(layout, tarfile.USTAR_FORMAT)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key in names:
            for ext, data in (("jpg", jpeg_bytes((1, 2, 3))), ("TXT", "café".encode()), ("json", b'{"u": 1}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if layout == "pax":
                    info.pax_headers = {"comment": "x" * 50}
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    shard = tmp_path / "00000.tar"
    if layout == "gzip":
        data = gzip.compress(data)
    elif layout == "cut_in_data":
        data = data[: 512 * 9 + 700]
    elif layout == "cut_at_header":
        data = data[: 512 * 6]
    elif layout == "garbage":
        data = data[: 512 * 6] + bytes(range(256)) * 4
    shard.write_bytes(data)
    for want in (("json",), ("jpg", "txt"), ()):
        fast, slow = _scan_both(str(shard), want)
        assert fast == slow, (layout, want)
    if layout in ("cut_in_data", "cut_at_header", "garbage"):
        assert fast[1] is not None and fast[1][3] == len(fast[0]) < len(names)
    else:
        assert fast[1] is None and [s["__key__"] for s in fast[0]] == names


def test_reader_processes_give_the_same_sidecars_and_report(tmp_path: Path, capsys) -> None:
    """``--workers 2`` reads and joins shards in other processes: same sidecars, same report counts;
    a shard that is not a tar still stops the attach naming it, with nothing installed."""
    pattern, keys = make_shards(tmp_path / "s", n_shards=9, per_shard=6, source="unused")
    caps = _write(tmp_path / "c.jsonl", _records(keys[:-5]))
    base = ["attach", "--shards", pattern, "--captions", str(caps), "--quiet", "--min-coverage", "0.5"]
    counts = {}
    for workers in ("0", "2"):
        side = tmp_path / f"side{workers}"
        assert cli([*base, "--name", "r", "--sidecar-dir", str(side), "--workers", workers]) == 0
        report = json.loads((side / "r.attach.json").read_text())
        counts[workers] = {k: report[k] for k in ("samples", "matched", "missing", "extra_keys", "sources")}
        assert _sidecars_in(side, "r") == {k: f"dense caption {k}" for k in keys[:-5]}
    assert counts["0"] == counts["2"]
    (tmp_path / "s" / "00004.tar").write_bytes(b"not a tar at all" * 64)
    capsys.readouterr()
    assert cli([*base, "--name", "q", "--workers", "2"]) == 1
    assert "00004.tar is unreadable at byte 0" in capsys.readouterr().err
    assert not list((tmp_path / "s").glob("*.q.json")) and not list((tmp_path / "s").glob(".*.staged"))
