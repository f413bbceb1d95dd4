"""What happens to bad data: one row per kind of bad input, each made by the test itself.

"train" is the caption-mixed training pipeline (``build_caption_pipeline`` over a DataLoader,
counts summed from every item's ``data_errors``); "attach" is ``python -m caption_mixing attach``.
Each row's check is the function ``case_<name>`` below the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from caption_mixing import Mixture, SharedEpoch
from caption_mixing.__main__ import main as cli
from caption_mixing.pipeline import build_caption_pipeline, make_loader
from caption_mixing.sidecar import read_sidecar, sidecar_path, write_sidecar
from tests.conftest import _add, jpeg_bytes, make_shards


class Case(NamedTuple):
    name: str
    bad_input: str
    command: str
    expected: str


CASES = [
    # name, bad input (generated here), command, expected outcome
    Case("corrupt_jpeg", "the last JPEG of 2 shards is garbage", "train, batch 4, drop_last",
         "skipped, warning names shard and key; corrupt_image=2 although both fall in the dropped tail"),
    Case("truncated_tar_at_header", "shard cut where sample 3's .txt header starts (image alone left)", "train",
         "samples 0-2 train, sample 3 (image only) does not; truncated_tar=1; warning: shard, offset, key"),
    Case("truncated_tar_in_data", "shard cut inside the data of sample 3's JPEG", "train",
         "samples 0-2 train; truncated_tar=1 (counted once, not twice)"),
    Case("truncated_tar_attach", "shard 1 of 3 cut inside its sample 2", "attach --min-coverage 0.5",
         "exit 0; warning names shard, offset, key; report lists it; extra keys = 3, never negative"),
    Case("random_bytes_shard_train", "shard 0 of 2 is 4 KiB of random bytes", "train",
         "shard 1 trains; unreadable_tar=1 (already so; pinned)"),
    Case("random_bytes_shard_attach", "shard 1 of 2 is 4 KiB of random bytes", "attach",
         "exit 1, error names the shard (no traceback); no sidecar written"),
    Case("blank_alt_fallback", "30 of 40 .txt empty, whitespace or missing; 20 of them have a synthetic caption",
         "train p=0 (blank_alt default: fallback)",
         "20 train on the synthetic caption, 10 skipped; blank_alt/fallback/altogether=20, blank_alt/skipped=10"),
    Case("blank_alt_skip", "same shard as blank_alt_fallback", "train p=0.5, blank_alt=skip",
         "the 10 samples with alt-text train; blank_alt/skipped=30"),
    Case("bad_utf8_txt", "a .txt holding b'caf\\xe9 \\xff'", "train",
         "trains with U+FFFD; bad_bytes=1; warning names shard and key"),
    Case("bad_utf8_caption_file", "caption file line 3 holds byte 0xff", "attach",
         "exit 0; warning names file and line 3; report caption_file_bad_utf8=1"),
    Case("bad_utf8_shard_member", "an in-shard caption member holds byte 0xff", "attach --from-member",
         "exit 0; warning names shard and key; report bad_utf8=1"),
    Case("empty_caption_file", "a 0-byte captions.jsonl", "attach",
         "exit 1, error says the file is empty; no sidecar written"),
    Case("all_empty_captions", "good syn sidecars exist; a new file whose captions are all ''", "attach --name syn",
         "exit 1 (coverage), says nothing was installed; old sidecars byte-identical"),
    Case("foreign_keys", "good syn sidecars exist; a new file whose keys are in no shard", "attach --name syn",
         "exit 1, says no record matched and nothing was installed; old sidecars byte-identical"),
    Case("duplicate_caption_keys", "caption file with key 'a' on rows 1 and 3", "attach",
         "exit 1 naming key and both rows; no sidecar written"),
    Case("duplicate_shard_keys", "shard 1 holds the same sample keys as shard 0", "attach",
         "exit 1 naming the key and both shards; no sidecar written"),
    Case("duplicate_key_in_one_shard", "sample key 'a' in two places of one shard", "attach",
         "exit 1 naming the key and the shard"),
    Case("name_escapes_attach", "--name 'x/../../../escaped'", "attach",
         "exit 2, error names --name; no file created anywhere"),
    Case("name_escapes_stats", "--sources 'alt,../x'", "stats", "exit 2, error names --sources"),
    Case("name_escapes_pipeline", "mixture source '../x'", "train", "ValueError naming the caption source"),
    Case("stale_tmp_files", "temp files of killed sidecar writes for syn (and one for another source)", "attach",
         "syn's temp files removed, the other source's kept; sidecars written"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level(logging.WARNING)
    globals()[f"case_{case.name}"](tmp_path, capsys, caplog)


def test_every_row_has_a_check_and_every_check_a_row() -> None:
    checks = {n.removeprefix("case_") for n in globals() if n.startswith("case_")}
    assert checks == {c.name for c in CASES}


# ---------------------------------------------------------------------------------------------
# Helpers: shards, cuts, the training pipeline and attach
# ---------------------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return path


def rewrite_member(shard: Path, member: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(shard, [(n, data if n == member else d) for n, d in items])


def cut_tar(shard: Path, member: str, inside_data: bool) -> int:
    """Truncate ``shard`` at the header of ``member`` or 10 bytes into its data; return the length."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    at = info.offset_data + 10 if inside_data else info.offset
    shard.write_bytes(shard.read_bytes()[:at])
    return at


def train(pattern: str, p: float = 0.0, batch_size: int = 4, drop_last: bool = False, **kw) -> dict:
    """One epoch; the keys and caption sources trained on, and every count of every item."""
    pipe = build_caption_pipeline(
        pattern,
        mixture=kw.pop("mixture", Mixture.from_p(p)),
        seed=0,
        epoch=SharedEpoch(0),
        image_transform=lambda im: torch.zeros(1),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        batch_size=batch_size,
        shuffle_buffer=0,
        drop_last=drop_last,
        **kw,
    )
    out = {"keys": [], "sources": [], "errors": Counter()}
    for item in make_loader(pipe, 0):
        out["errors"].update(item.get("data_errors", {}))
        if not item.get("errors_only"):
            out["keys"] += item["keys"]
            out["sources"] += item["sources"]
    return out


def attach(capsys, *args: str) -> tuple[int, str]:
    rc = cli(["attach", *args, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def records(keys: list[str], caption: str = "dense caption {k}") -> str:
    return "".join(json.dumps({"key": k, "caption": caption.format(k=k)}) + "\n" for k in keys)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def good_syn_sidecars(tmp: Path, capsys) -> tuple[str, list[str], dict[str, str]]:
    """Shards with syn sidecars from a good attach; returns (pattern, keys, sidecar digests)."""
    pattern, keys = make_shards(tmp / "s", n_shards=2, per_shard=5, source="unused")
    (tmp / "good.jsonl").write_text(records(keys))
    assert attach(capsys, "--shards", pattern, "--captions", str(tmp / "good.jsonl"), "--name", "syn")[0] == 0
    sidecars = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp / "s").glob("*.syn.json")}
    assert len(sidecars) == 2
    return pattern, keys, sidecars


def assert_unchanged(folder: Path, before: dict[str, str]) -> None:
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.syn.json")}
    assert after == before
    assert not list(folder.glob(".*.staged"))


# ---------------------------------------------------------------------------------------------
# The checks, one per row
# ---------------------------------------------------------------------------------------------


def case_corrupt_jpeg(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp, n_shards=2, per_shard=6)
    for s in (0, 1):
        rewrite_member(tmp / f"0000{s}.tar", f"0000{s}0005.jpg", b"\xff\xd8 not a jpeg")
    got = train(pattern, drop_last=True)
    assert len(got["keys"]) == 8 and "000000005" not in got["keys"]
    assert got["errors"] == {"corrupt_image": 2}
    assert "000000005" in caplog.text and "00000.tar" in caplog.text


def case_truncated_tar_at_header(tmp: Path, capsys, caplog) -> None:
    make_shards(tmp, n_shards=1, per_shard=6)
    at = cut_tar(tmp / "00000.tar", "000000003.txt", inside_data=False)
    got = train(str(tmp / "00000.tar"))
    assert got["keys"] == ["000000000", "000000001", "000000002"]
    assert got["errors"] == {"truncated_tar": 1}
    assert f"00000.tar is truncated at byte {at}" in caplog.text and "'000000003'" in caplog.text


def case_truncated_tar_in_data(tmp: Path, capsys, caplog) -> None:
    make_shards(tmp, n_shards=1, per_shard=6)
    cut_tar(tmp / "00000.tar", "000000003.jpg", inside_data=True)
    got = train(str(tmp / "00000.tar"))
    assert got["keys"] == ["000000000", "000000001", "000000002"]
    assert got["errors"] == {"truncated_tar": 1}


def case_truncated_tar_attach(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp / "s", n_shards=3, per_shard=5, source="unused")
    at = cut_tar(tmp / "s" / "00001.tar", "000010002.jpg", inside_data=True)
    (tmp / "c.jsonl").write_text(records(keys))
    rc, out = attach(
        capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r", "--min-coverage", "0.5"
    )
    assert rc == 0
    assert "00001.tar is truncated at byte" in out and "'000010002'" in out
    report = json.loads((tmp / "s" / "r.attach.json").read_text())
    assert report["truncated_shards"] == [
        {"shard": str(tmp / "s" / "00001.tar"), "kind": "truncated_tar", "offset": at - 10 - 512, "key": "000010002",
         "samples": 2}
    ]  # fmt: skip
    assert (report["samples"], report["matched"], report["extra_keys"]) == (12, 12, 3)


def case_random_bytes_shard_train(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp, n_shards=2, per_shard=4)
    (tmp / "00000.tar").write_bytes(bytes(range(256)) * 16)
    got = train(pattern)
    assert got["keys"] == keys[4:] and got["errors"] == {"unreadable_tar": 1}


def case_random_bytes_shard_attach(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp / "s", n_shards=2, per_shard=4, source="unused")
    (tmp / "s" / "00001.tar").write_bytes(bytes(range(256)) * 16)
    (tmp / "c.jsonl").write_text(records(keys))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 1 and "00001.tar is unreadable at byte 0" in out
    assert not list((tmp / "s").glob("*.r.json")) and not list((tmp / "s").glob(".*.staged"))


def _blank_alt_shard(tmp: Path) -> tuple[str, list[str]]:
    """40 samples: 0-9 with alt-text, 10-19 empty .txt, 20-29 whitespace, 30-39 no .txt; the
    synthetic source covers 10-16, 20-26 and 30-35 (20 of the 30 blank ones) and 0-9."""
    members, synthetic = [], {}
    for i in range(40):
        key = f"k{i:02d}"
        members.append((f"{key}.jpg", jpeg_bytes((10, 20, 30))))
        if i < 30:
            members.append((f"{key}.txt", f"alt {key}".encode() if i < 10 else (b"" if i < 20 else b" \n\t ")))
        if i < 10 or i % 10 < (6 if i >= 30 else 7):
            synthetic[key] = f"synthetic {key}"
    shard = write_tar(tmp / "00000.tar", members)
    write_sidecar(sidecar_path(shard, "altogether"), shard, "altogether", synthetic)
    return str(shard), sorted(synthetic)


def case_blank_alt_fallback(tmp: Path, capsys, caplog) -> None:
    pattern, synthetic = _blank_alt_shard(tmp)
    got = train(pattern, p=0.0)
    blank_with_synthetic = [k for k in synthetic if k >= "k10"]
    assert len(blank_with_synthetic) == 20
    assert sorted(got["keys"]) == sorted([f"k{i:02d}" for i in range(10)] + blank_with_synthetic)
    used = dict(zip(got["keys"], got["sources"], strict=True))
    assert all(used[k] == "altogether" for k in blank_with_synthetic)
    assert got["errors"] == {"blank_alt/fallback/altogether": 20, "blank_alt/skipped": 10}


def case_blank_alt_skip(tmp: Path, capsys, caplog) -> None:
    pattern, _ = _blank_alt_shard(tmp)
    got = train(pattern, p=0.5, blank_alt="skip")
    assert sorted(got["keys"]) == [f"k{i:02d}" for i in range(10)]
    assert got["errors"] == {"blank_alt/skipped": 30}


def case_bad_utf8_txt(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp, n_shards=1, per_shard=4)
    rewrite_member(tmp / "00000.tar", "000000002.txt", b"caf\xe9 \xff")
    got = train(pattern)
    assert len(got["keys"]) == 4 and got["errors"] == {"bad_bytes": 1}
    assert "000000002" in caplog.text and "00000.tar" in caplog.text and "not UTF-8" in caplog.text


def case_bad_utf8_caption_file(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp / "s", n_shards=1, per_shard=4, source="unused")
    lines = records(keys).encode().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"dense", b"dens\xff")
    (tmp / "c.jsonl").write_bytes(b"".join(lines))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 0 and "c.jsonl: 1 lines are not UTF-8 (lines 3)" in out
    assert json.loads((tmp / "s" / "r.attach.json").read_text())["caption_file_bad_utf8"] == 1
    assert read_sidecar(tmp / "s" / "00000.r.json")[keys[2]] == f"dens\ufffd caption {keys[2]}"


def case_bad_utf8_shard_member(tmp: Path, capsys, caplog) -> None:
    members = []
    for i in range(3):
        caption = b"syn \xff" if i == 1 else f"syn {i}".encode()
        members += [(f"k{i}.jpg", jpeg_bytes((1, 2, 3))), (f"k{i}.txt", b"alt"), (f"k{i}.syn.txt", caption)]
    shard = write_tar(tmp / "00000.tar", members)
    rc, out = attach(capsys, "--shards", str(shard), "--from-member", "syn.txt", "--name", "syn")
    assert rc == 0 and "sample 'k1' in shard" in out and "not UTF-8" in out
    assert json.loads((tmp / "syn.attach.json").read_text())["bad_utf8"] == 1


def case_empty_caption_file(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp / "s", n_shards=2, per_shard=3, source="unused")
    (tmp / "c.jsonl").write_bytes(b"")
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 1 and "c.jsonl is empty" in out
    assert not list((tmp / "s").glob("*.r.json"))


def case_all_empty_captions(tmp: Path, capsys, caplog) -> None:
    pattern, keys, before = good_syn_sidecars(tmp, capsys)
    (tmp / "empty.jsonl").write_text(records(keys, caption=""))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "empty.jsonl"), "--name", "syn")
    assert_unchanged(tmp / "s", before)
    assert rc == 1 and "every matched caption is empty" in out and "existing syn sidecars are unchanged" in out


def case_foreign_keys(tmp: Path, capsys, caplog) -> None:
    pattern, keys, before = good_syn_sidecars(tmp, capsys)
    (tmp / "foreign.jsonl").write_text(records([f"other-{k}" for k in keys]))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "foreign.jsonl"), "--name", "syn")
    assert_unchanged(tmp / "s", before)
    assert rc == 1 and "no caption record matched a sample key" in out and "unchanged" in out


def case_duplicate_caption_keys(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp / "s", n_shards=1, per_shard=3, source="unused")
    (tmp / "c.jsonl").write_text(records(["a", "b", "a"]))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 1 and "duplicate key 'a' on row 3 (first on row 1)" in out
    assert not list((tmp / "s").glob("*.r.json"))


def case_duplicate_shard_keys(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp / "s", n_shards=2, per_shard=3, source="unused")
    (tmp / "s" / "00001.tar").write_bytes((tmp / "s" / "00000.tar").read_bytes())
    (tmp / "c.jsonl").write_text(records(keys))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 1 and "sample key '000000000' is in two shards" in out
    assert "00000.tar and " in out and "00001.tar" in out
    assert not list((tmp / "s").glob("*.r.json"))


def case_duplicate_key_in_one_shard(tmp: Path, capsys, caplog) -> None:
    members = [("a.jpg", b"x"), ("a.txt", b"x"), ("b.jpg", b"x"), ("a.json", b"{}")]
    shard = write_tar(tmp / "00000.tar", members)
    (tmp / "c.jsonl").write_text(records(["a", "b"]))
    rc, out = attach(capsys, "--shards", str(shard), "--captions", str(tmp / "c.jsonl"), "--name", "r")
    assert rc == 1 and "sample key 'a' appears twice in shard" in out and "00000.tar" in out


def case_name_escapes_attach(tmp: Path, capsys, caplog) -> None:
    deep = tmp / "a" / "b" / "c"
    pattern, keys = make_shards(deep / "s", n_shards=1, per_shard=3, source="unused")
    (deep / "c.jsonl").write_text(records(keys))
    before = digests(tmp)
    rc = cli(["attach", "--shards", pattern, "--captions", str(deep / "c.jsonl"), "--name", "x/../../../escaped"])
    assert rc == 2 and "--name: 'x/../../../escaped' is not a valid name" in capsys.readouterr().err
    assert digests(tmp) == before and not list(tmp.rglob("*escaped*"))


def case_name_escapes_stats(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp, n_shards=1, per_shard=2)
    assert cli(["stats", "--shards", pattern, "--sources", "alt,../x", "--quiet"]) == 2
    assert "--sources: '../x' is not a valid name" in capsys.readouterr().err


def case_name_escapes_pipeline(tmp: Path, capsys, caplog) -> None:
    pattern, _ = make_shards(tmp, n_shards=1, per_shard=2)
    with pytest.raises(ValueError, match=r"caption source: '\.\./x' is not a valid name"):
        train(pattern, mixture=Mixture.parse("alt=0.5,../x=0.5"))


def case_stale_tmp_files(tmp: Path, capsys, caplog) -> None:
    pattern, keys = make_shards(tmp / "s", n_shards=2, per_shard=3, source="unused")
    ours = [tmp / "s" / ".00000.syn.json.k2j4x9_a.tmp", tmp / "s" / "..00001.syn.json.staged.abcdefgh.tmp"]
    theirs = tmp / "s" / ".00000.other.json.abcdefgh.tmp"
    for p in (*ours, theirs):
        p.write_bytes(b'{"half": ')
    (tmp / "c.jsonl").write_text(records(keys))
    rc, out = attach(capsys, "--shards", pattern, "--captions", str(tmp / "c.jsonl"), "--name", "syn")
    assert rc == 0 and not any(p.exists() for p in ours) and theirs.exists()
    assert len(read_sidecar(tmp / "s" / "00000.syn.json")) == 3


def test_build_folder_once_leaves_nothing_half_written(tmp_path):
    """A failing build leaves neither the folder nor its private temp; a finished one is built once."""
    from caption_mixing.atomic import build_folder_once

    root = tmp_path / "cache" / "component"

    def fails(tmp):
        (tmp / "weights.bin").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_folder_once(root, "done.json", fails)
    assert not root.exists() and list((tmp_path / "cache").iterdir()) == []

    with pytest.raises(RuntimeError, match="done.json"):  # a build that forgets its marker is not published
        build_folder_once(root, "done.json", lambda tmp: (tmp / "weights.bin").write_bytes(b"w"))
    assert not root.exists()

    calls = []

    def builds(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "done.json").write_text("{}")

    assert build_folder_once(root, "done.json", builds) is True
    assert build_folder_once(root, "done.json", builds) is False
    assert len(calls) == 1 and (root / "weights.bin").read_bytes() == b"w"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["component"]
