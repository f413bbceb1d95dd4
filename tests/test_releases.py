"""Published recaption sets attached as released (issue 15): one fixture per release, in its exact
layout, generated here from the embedded testbed's shards; the coverage report checked; the
attached sources read by the training pipeline (and one CLIP run reading every format); bad inputs; coverage-aware p;
shards behind ``pipe:`` and fsspec URLs; MetaCLIP's layout both ways."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from caption_mixing.__main__ import main as cli
from caption_mixing.joins import normalize_url, row_of_key
from caption_mixing.mixing import Mixture, effective_mixture, pick_variant
from caption_mixing.pipeline import SharedEpoch, caption_sample_stages
from caption_mixing.releases import RELEASES
from caption_mixing.sidecar import read_sidecar, read_sidecar_fields, sidecar_path
from testbed import TestbedConfig, build_testbed

TINY = TestbedConfig(num_train=384, shard_size=96, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
DREAMLIP_COLUMNS = [
    "Image Path",
    "raw_caption",
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
]


@pytest.fixture(scope="module")
def testbed_train(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root, TINY, progress=False)
    return root / "train"


def read_samples(shard: Path) -> list[dict]:
    """The members of a testbed shard, per sample, with its json parsed."""
    out: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {"key": key})[ext] = tar.extractfile(m).read()
    for s in out.values():
        s["meta"] = json.loads(s["json"])
    return list(out.values())


def copy_shards(
    src: Path, dst: Path, meta=None, members=None, img2dataset_keys: bool = False
) -> tuple[str, list[dict]]:
    """Testbed shards rewritten into ``dst`` with ``meta(sample)`` added to each json and
    ``members(sample)`` added as members (e.g. DataComp's uid, DataCompDR's syn.json). With
    ``img2dataset_keys`` the keys are img2dataset's for 96 rows per shard (2 digits for the index)."""
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.tar"))
    samples = []
    for n, shard in enumerate(shards):
        rows = read_samples(shard)
        with tarfile.open(dst / shard.name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, s in enumerate(rows):
                if img2dataset_keys:
                    s["key"] = s["meta"]["key"] = f"{n * 100 + i:07d}"
                s["meta"].update(meta(s) if meta else {})
                extra = members(s) if members else {}
                for ext, data in (("jpg", s["jpg"]), ("txt", s["txt"]), ("json", json.dumps(s["meta"]).encode())):
                    _add(tar, f"{s['key']}.{ext}", data)
                for ext, data in extra.items():
                    _add(tar, f"{s['key']}.{ext}", data)
                s["shard"] = shard.name
                samples.append(s)
    return str(dst / f"{{00000..{len(shards) - 1:05d}}}.tar"), samples


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def attach(capsys, *args: str) -> tuple[int, str]:
    rc = cli(["attach", *args, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def report_of(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.attach.json").read_text())


def sidecars(pattern_dir: Path, name: str, sidecar_dir: Path | None = None) -> dict:
    out = {}
    for shard in sorted(pattern_dir.glob("*.tar")):
        path = sidecar_path(shard, name, sidecar_dir)
        out.update(read_sidecar(path, shard=shard))
    return out


def train_draws(
    pattern: str, mixture: Mixture, epochs: int = 1, sidecar_dir: str | None = None, p_mode: str = "paper"
) -> list[list[tuple[str, str, str]]]:
    """Per epoch, (key, caption, source) of every sample the training pipeline yields."""
    epoch = SharedEpoch(0)
    stages = caption_sample_stages(
        pattern, mixture=mixture, seed=7, epoch=epoch, sidecar_dir=sidecar_dir, shuffle=False, p_mode=p_mode
    )
    out = []
    for e in range(epochs):
        epoch.set(e)
        out.append([(s["__key__"], s["caption"], s["caption_source"]) for s in wds.DataPipeline(*stages)])
    return out


def digests(folder: Path, pattern: str = "*.json") -> dict[str, str]:
    """Sidecars and the reports of what is installed (a failed run's own report is beside them)."""
    paths = [p for p in sorted(folder.glob(pattern)) if not p.name.endswith(".attach.failed.json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def covered(samples: list[dict], every: int = 11) -> list[dict]:
    """All samples but every ``every``-th one: a release covers part of a user's shards."""
    return [s for i, s in enumerate(samples) if i % every != every - 1]


# ---------------------------------------------------------------------------------------------
# One release per test: its layout, the join, the report, and training reading it
# ---------------------------------------------------------------------------------------------


def write_dreamlip(path: Path, samples: list[dict], extra: int = 5) -> dict[str, dict]:
    """DreamLIP's CSV: ``Image Path`` holds the URL; 6 synthetic captions + raw. Some URLs are
    written in another spelling (upper-case host, default port), one caption holds a quoted newline."""
    rows, expected = [], {}
    for i, s in enumerate(samples):
        url = s["meta"]["url"]
        if i % 7 == 0:
            url = url.replace("https://images.example.com/", "HTTPS://Images.Example.COM:443/")
        caps = {c: f"{c} of {s['key']}" for c in DREAMLIP_COLUMNS[2:]}
        if i == 3:
            caps["longLLA_captions"] = f'A long, "quoted" caption\nover two lines of {s["key"]}'
        rows.append({"Image Path": url, "raw_caption": s["txt"].decode(), **caps})
        expected[s["key"]] = caps
    for j in range(extra):
        rows.append({"Image Path": f"https://gone.example.com/{j}.jpg", "raw_caption": "x", **caps})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DREAMLIP_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return expected


def test_dreamlip_csv_url_join_several_sources_in_one_pass(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    release = covered(samples)
    expected = write_dreamlip(tmp_path / "cc12m_3long_3short_1raw_captions_url.csv", release)
    columns = "long_llava=longLLA_captions,short_llava=shortLLA_captions,dreamlip=shortIB_captions+longIB_captions"
    rc, out = attach(
        capsys,
        *("--shards", pattern, "--format", "dreamlip"),
        *("--captions", str(tmp_path / "cc12m_3long_3short_1raw_captions_url.csv"), "--columns", columns),
    )
    assert rc == 0, out  # coverage 0.91 < 0.95: reported, not fatal, for a release
    assert "reported, not fatal for --format dreamlip" in out
    report = report_of(tmp_path / "s", "long_llava")
    n, hit = len(samples), len(release)
    for source in ("long_llava", "short_llava", "dreamlip"):
        c = report["sources"][source]
        assert (c["matched"], c["missing"], c["empty"]) == (hit, n - hit, 0)
        assert c["coverage"] == pytest.approx(hit / n)
        assert c["synthetic_share"]["0.15"]["paper"] == pytest.approx(0.15 * hit / n)
    assert report["extra_keys"] == 5 and report["caption_records"] == hit + 5
    assert report["normalized_matches"] == len([i for i in range(hit) if i % 7 == 0])
    assert report["sources"]["dreamlip"]["variants_per_caption"] == 2.0
    long = sidecars(tmp_path / "s", "long_llava")
    assert long == {k: v["longLLA_captions"] for k, v in expected.items()}
    assert "\nover two lines" in long[release[3]["key"]]  # the quoted newline stayed inside its caption
    both = sidecars(tmp_path / "s", "dreamlip")
    assert both[release[0]["key"]] == [expected[release[0]["key"]][c] for c in ("shortIB_captions", "longIB_captions")]

    mix = Mixture.parse("alt=0.4,long_llava=0.3,dreamlip=0.3")
    epochs = train_draws(pattern, mix, epochs=6)
    used = Counter(src for epoch in epochs for _, _, src in epoch)
    assert used["long_llava"] > 0 and used["dreamlip"] > 0
    key = release[0]["key"]
    drawn = {cap for epoch in epochs for k, cap, src in epoch if k == key and src == "dreamlip"}
    assert drawn <= set(both[key])
    again = train_draws(pattern, mix, epochs=6)
    assert again == epochs  # variants and sources: the same draws from (seed, epoch, key)


def test_capsfusion_parquet_files_and_duplicate_urls(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    release = covered(samples, every=20)
    rows = [
        {
            "image_url": s["meta"]["url"],
            "laion_2b": s["txt"].decode(),
            "laion_coco": f"coco-style caption of {s['key']}",
            "capsfusion": f"fused caption of {s['key']}",
        }
        for s in release
    ]
    dup = {**rows[2], "capsfusion": "a different caption for the same URL"}
    pq.write_table(pa.Table.from_pylist(rows[:200]), tmp_path / "capsfusion_1.parquet")
    pq.write_table(pa.Table.from_pylist([*rows[200:], dup]), tmp_path / "capsfusion_2.parquet", row_group_size=50)
    base = ["--shards", pattern, "--format", "capsfusion", "--captions", str(tmp_path / "capsfusion_{1..2}.parquet")]
    rc, out = attach(capsys, *base, "--columns", "capsfusion=capsfusion,laion_coco=laion_coco")
    assert rc == 0, out
    assert "1 records repeat a url with a different caption" in out and "rule 'first'" in out
    report = report_of(tmp_path / "s", "capsfusion")
    assert report["duplicates"]["file"]["rows"] == 1 and report["duplicates"]["file"]["conflicting"] == 1
    assert "row 3 of" in report["duplicates"]["file"]["examples"][0]  # rows[2] is Parquet row 3
    assert report["sources"]["capsfusion"]["matched"] == len(release)
    fused = sidecars(tmp_path / "s", "capsfusion")
    assert fused[release[2]["key"]] == f"fused caption of {release[2]['key']}"  # the first record wins

    before = digests(tmp_path / "s")
    rc, out = attach(capsys, *base, "--columns", "capsfusion=capsfusion", "--duplicates", "error")
    assert rc == 1 and "capsfusion_2.parquet: duplicate key" in out and "(first on row 3 of" in out
    assert digests(tmp_path / "s") == before and not list((tmp_path / "s").glob(".*.staged"))

    epochs = train_draws(pattern, Mixture.parse("alt=0.5,capsfusion=0.25,laion_coco=0.25"), epochs=2)
    used = Counter(src for epoch in epochs for _, _, src in epoch)
    assert {"alt", "capsfusion", "laion_coco"} <= set(used)


def test_pixelprose_parquet(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    release = covered(samples, every=4)
    rows = [
        {
            "uid": f"pp{i}",
            "url": s["meta"]["url"] + ("/" if i % 5 == 0 else ""),  # a trailing slash: matched after normalizing
            "key": str(i),
            "status": "success",
            "original_caption": s["txt"].decode(),
            "vlm_model": "gemini-1.0-pro-vision",
            "vlm_caption": f"This image displays sample {s['key']}.",
        }
        for i, s in enumerate(release)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pixelprose.parquet")
    rc, out = attach(
        capsys, "--shards", pattern, "--format", "pixelprose", "--captions", str(tmp_path / "pixelprose.parquet"),
        "--name", "pixelprose",
    )  # fmt: skip
    assert rc == 0, out
    report = report_of(tmp_path / "s", "pixelprose")
    assert report["coverage"] == pytest.approx(0.75) and report["normalized_matches"] == len(release[::5])
    assert "p=0.15: 0.1125" in out  # the share p=0.15 realizes with 75% coverage
    draws = train_draws(pattern, Mixture.from_p(1.0, "pixelprose"))[0]
    used = Counter(src for _, _, src in draws)
    assert used == {"pixelprose": len(release), "alt": len(samples) - len(release)}


def test_recap_datacomp_sha256_join_with_scores(testbed_train: Path, tmp_path: Path, capsys) -> None:
    def meta(s: dict) -> dict:  # img2dataset's sha256 in the json for the first two shards only
        return {"sha256": hashlib.sha256(s["jpg"]).hexdigest()} if s["key"] < "00002" else {}

    pattern, samples = copy_shards(testbed_train, tmp_path / "s", meta=meta)
    release = covered(samples, every=10)
    rows = [
        {
            "url": f"https://elsewhere.example.org/{i}.jpg",  # a different URL: only the hash finds the sample
            "re_caption": f"LLaVA-3 recaption of {s['key']}",
            "org_caption": s["txt"].decode(),
            "sha256": hashlib.sha256(s["jpg"]).hexdigest(),
            "key": f"{i:09d}",
            "re_clip_score": 0.25 + i / 10000,
            "org_clip_score": 0.3,
        }
        for i, s in enumerate(release)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "recap.parquet")
    rc, out = attach(
        capsys, "--shards", pattern, "--format", "recap-datacomp", "--captions", str(tmp_path / "recap.parquet"),
        "--name", "recap",
    )  # fmt: skip
    assert rc == 0, out
    report = report_of(tmp_path / "s", "recap")
    assert report["matched"] == len(release) and report["fields"]["re_clip_score"]["values"] == len(release)
    shard = tmp_path / "s" / "00003.tar"  # no sha256 in its json: computed from the image bytes
    caps = read_sidecar(sidecar_path(shard, "recap"), shard=shard)
    scores = read_sidecar_fields(sidecar_path(shard, "recap"), shard=shard)
    i, s = next((i, s) for i, s in enumerate(release) if s["shard"] == "00003.tar")
    assert caps[s["key"]] == f"LLaVA-3 recaption of {s['key']}"
    assert scores["re_clip_score"][s["key"]] == pytest.approx(0.25 + i / 10000)
    draws = train_draws(pattern, Mixture.from_p(1.0, "recap"))[0]
    assert Counter(src for _, _, src in draws)["recap"] == len(release)


def test_vecap_json_dicts_streamed(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    release = covered(samples, every=3)
    (tmp_path / "vecap").mkdir()
    half = len(release) // 2
    for n, part in enumerate((release[:half], release[half:])):
        doc = {s["meta"]["url"]: f"VeCap caption of {s['key']}" for s in part}
        (tmp_path / "vecap" / f"vecap_{n}.json").write_text(json.dumps(doc, indent=1))
    rc, out = attach(
        capsys, "--shards", pattern, "--format", "vecap", "--captions", str(tmp_path / "vecap" / "*.json"),
        "--name", "vecap",
    )  # fmt: skip
    assert rc == 0, out
    assert report_of(tmp_path / "s", "vecap")["matched"] == len(release)
    assert sidecars(tmp_path / "s", "vecap")[release[-1]["key"]] == f"VeCap caption of {release[-1]['key']}"
    draws = train_draws(pattern, Mixture.from_p(0.5, "vecap"))[0]
    assert {src for _, _, src in draws} == {"alt", "vecap"}


def test_datacomp_blip2_uid_join(testbed_train: Path, tmp_path: Path, capsys) -> None:
    def uid(s: dict) -> dict:
        return {"uid": hashlib.md5(s["key"].encode()).hexdigest()}

    pattern, samples = copy_shards(testbed_train, tmp_path / "s", meta=uid)
    release = covered(samples, every=6)
    for temp in ("0.75", "1.0"):
        with (tmp_path / f"blip2_temp{temp}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["uid", "blip2-cap"])
            w.writerows([s["meta"]["uid"], f"blip2 t={temp} {s['key']}"] for s in release)
    for temp, name in (("0.75", "blip2_t075"), ("1.0", "blip2_t100")):
        rc, out = attach(
            capsys, "--shards", pattern, "--format", "datacomp-blip2", "--captions",
            str(tmp_path / f"blip2_temp{temp}.csv"), "--name", name,
        )  # fmt: skip
        assert rc == 0, out
        assert report_of(tmp_path / "s", name)["matched"] == len(release)
    assert sidecars(tmp_path / "s", "blip2_t100")[release[0]["key"]] == f"blip2 t=1.0 {release[0]['key']}"
    draws = train_draws(pattern, Mixture.parse("alt=0.2,blip2_t075=0.4,blip2_t100=0.4"))[0]
    assert {"blip2_t075", "blip2_t100"} <= {src for _, _, src in draws}


def test_datacompdr_in_shard_variants_drawn_uniformly(testbed_train: Path, tmp_path: Path, capsys) -> None:
    def syn(s: dict) -> dict:
        if s["key"].endswith("7"):
            return {}  # a sample without syn.json
        return {"syn.json": json.dumps({"syn_text": [f"syn {j} of {s['key']}" for j in range(5)]}).encode()}

    pattern, samples = copy_shards(testbed_train, tmp_path / "s", members=syn)
    rc, out = attach(capsys, "--shards", pattern, "--format", "datacompdr", "--name", "dr")
    assert rc == 0, out
    report = report_of(tmp_path / "s", "dr")
    with_syn = [s for s in samples if not s["key"].endswith("7")]
    assert report["matched"] == len(with_syn) and report["sources"]["dr"]["variants_per_caption"] == 5.0
    draws = train_draws(pattern, Mixture.from_p(1.0, "dr"), epochs=10)
    picked = Counter(cap.split()[1] for epoch in draws for _, cap, src in epoch if src == "dr")
    assert set(picked) == {"0", "1", "2", "3", "4"}
    total = sum(picked.values())
    assert all(abs(v / total - 0.2) < 0.03 for v in picked.values()), picked  # uniform over ~3500 draws
    key = with_syn[0]["key"]
    per_epoch = [cap for epoch in draws for k, cap, _ in epoch if k == key]
    assert len(set(per_epoch)) > 1  # a new variant per visit, as the source itself is drawn per visit
    assert pick_variant([f"v{j}" for j in range(5)], "dr", 7, 3, key) == pick_variant(
        [f"v{j}" for j in range(5)], "dr", 7, 3, key
    )
    rc = cli(["stats", "--shards", pattern, "--sources", "alt,dr", "--model", "EmbeddedCLIP-Tiny", "--quiet"])
    assert rc == 0 and f"| dr | {5 * len(with_syn)} |" in capsys.readouterr().out  # stats counts every variant


def write_laclip(folder: Path, samples: list[dict], order: list[int] | None = None) -> list[Path]:
    """LaCLIP: one rewrite per line per style, line-aligned with the input TSV (written here too)."""
    order = list(range(len(samples))) if order is None else order
    with (folder / "cc12m.tsv").open("w") as f:
        f.write("url\tcaption\n")  # the header users add for img2dataset
        for i in order:
            f.write(f"{samples[i]['meta']['url']}\t{samples[i]['txt'].decode()}\n")
    files = []
    for style in ("chatgpt", "bard", "mscoco", "human"):
        path = folder / f"cc12m_{style}.txt"
        path.write_text("".join(f"{style} rewrite of {samples[i]['key']}\n" for i in order))
        files.append(path)
    return files


def test_laclip_row_join_checked_against_the_original_caption(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s", img2dataset_keys=True)
    assert row_of_key(samples[100]["key"], rows_per_shard=96) == 100  # 96 rows per shard: key 0000104 is row 100
    write_laclip(tmp_path, samples)
    base = ["--shards", pattern, "--format", "laclip", "--captions", str(tmp_path / "cc12m_*.txt")]
    rc, out = attach(capsys, *base, "--original", str(tmp_path / "cc12m.tsv"), "--rows-per-shard", "96", "--name", "la")
    assert rc == 0, out
    report = report_of(tmp_path / "s", "la")
    assert report["row_check"] == {"checked": len(samples), "mismatched": 0, "examples": []}
    caps = sidecars(tmp_path / "s", "la")
    key = samples[200]["key"]
    assert sorted(caps[key]) == sorted(f"{s} rewrite of {key}" for s in ("chatgpt", "bard", "mscoco", "human"))
    draws = train_draws(pattern, Mixture.from_p(1.0, "la"), epochs=4)
    styles = Counter(cap.split()[0] for epoch in draws for _, cap, _ in epoch)
    assert set(styles) == {"chatgpt", "bard", "mscoco", "human"}

    before = digests(tmp_path / "s")
    order = list(range(len(samples)))
    order[10:20] = reversed(order[10:20])  # a re-ordered input file: keys no longer are its rows
    write_laclip(tmp_path, samples, order)
    rc, out = attach(capsys, *base, "--original", str(tmp_path / "cc12m.tsv"), "--rows-per-shard", "96", "--name", "la")
    assert rc == 1 and "do not match their row's original caption" in out and "unchanged" in out
    assert digests(tmp_path / "s") == before
    rc, out = attach(capsys, *base, "--name", "la")
    assert rc == 2 and "--original" in out


def test_metaclip_import_and_export_round_trip(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    caps = tmp_path / "metaclip_caps"
    for shard in range(4):  # {cap_dir}/{shard % 100}/{shard}.json; shard 3 in the captioner's form
        own = [s for s in samples if s["shard"] == f"{shard:05d}.tar"][:-4]
        doc = {s["key"]: f"altogether caption of {s['key']}" for s in own}
        if shard == 3:
            doc = {k: {"altogether": v} for k, v in doc.items()}
        (caps / str(shard)).mkdir(parents=True)
        (caps / str(shard) / f"{shard}.json").write_text(json.dumps(doc))
    rc = cli(["import", "--shards", pattern, "--cap-dir", str(caps), "--name", "altogether", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = report_of(tmp_path / "s", "altogether")
    assert report["matched"] == len(samples) - 16 and report["extra_keys"] == 0
    imported = sidecars(tmp_path / "s", "altogether")
    assert imported[samples[-5]["key"]] == f"altogether caption of {samples[-5]['key']}"

    exported = tmp_path / "exported"
    assert cli(["export", "--shards", pattern, "--source", "altogether", "--cap-dir", str(exported)]) == 0
    for shard in range(3):
        assert json.loads((exported / str(shard) / f"{shard}.json").read_text()) == json.loads(
            (caps / str(shard) / f"{shard}.json").read_text()
        )
    plain = json.loads((exported / "3" / "3.json").read_text())
    assert plain == {k: v["altogether"] for k, v in json.loads((caps / "3" / "3.json").read_text()).items()}

    (caps / "2" / "2.json").write_text(json.dumps(["not", "a", "dict"]))
    before = digests(tmp_path / "s")
    rc = cli(["import", "--shards", pattern, "--cap-dir", str(caps), "--name", "altogether", "--quiet", "--force"])
    out = capsys.readouterr()
    assert rc == 1 and "2.json: expected one JSON object" in out.err and "unchanged" in out.err
    assert digests(tmp_path / "s") == before


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming file, row and field, or a counted skip; nothing half-installed
# ---------------------------------------------------------------------------------------------


def test_bad_release_files_name_file_row_and_field(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    good = tmp_path / "vecap.json"
    good.write_text(json.dumps({s["meta"]["url"]: f"VeCap {s['key']}" for s in samples}))
    args = ["--shards", pattern, "--name", "syn"]
    assert attach(capsys, *args, "--format", "vecap", "--captions", str(good))[0] == 0
    before = digests(tmp_path / "s")

    not_a_dict = tmp_path / "list.json"
    not_a_dict.write_text(json.dumps([[s["meta"]["url"], "caption"] for s in samples]))
    rc, out = attach(capsys, *args, "--format", "vecap", "--captions", str(not_a_dict))
    assert rc == 1 and f"{not_a_dict}: expected one JSON object" in out and "the file is a list" in out
    cut = tmp_path / "cut.json"
    cut.write_text(good.read_text()[:-100])
    rc, out = attach(capsys, *args, "--format", "vecap", "--captions", str(cut))
    assert rc == 1 and f"{cut}: entry" in out
    assert digests(tmp_path / "s") == before  # the good sidecars and their report are intact

    no_column = tmp_path / "pixelprose.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": s["meta"]["url"], "caption": "x"} for s in samples]), no_column)
    rc, out = attach(capsys, *args, "--format", "pixelprose", "--captions", str(no_column))
    assert rc == 1 and f"{no_column}: no column 'vlm_caption' (columns: url, caption)" in out
    assert digests(tmp_path / "s") == before and not list((tmp_path / "s").glob(".*.staged"))

    short = tmp_path / "dreamlip.csv"
    write_dreamlip(short, samples, extra=0)
    lines = short.read_text().splitlines(keepends=True)
    lines[7] = lines[7].split(",")[0] + ",raw only\n"  # a row cut after its second field
    short.write_text("".join(lines))
    rc, out = attach(capsys, *args, "--format", "dreamlip", "--captions", str(short), "--force")
    assert rc == 0, out
    assert "dreamlip.csv: line 8 (2 fields, no 'shortIB_captions'): row skipped" in out
    report = report_of(tmp_path / "s", "syn")
    assert report["skipped_rows"] == 1 and report["missing"] == 1


def test_duplicate_url_rules(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    url = samples[5]["meta"]["url"]
    rows = [{"url": s["meta"]["url"], "caption": f"c {s['key']}"} for s in samples]
    rows += [
        {"url": url, "caption": "another caption"},
        {"url": samples[6]["meta"]["url"], "caption": rows[6]["caption"]},
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--shards", pattern, "--captions", str(path), "--join-on", "url", "--name", "syn", "--force"]
    rc, out = attach(capsys, *args)
    assert rc == 0, out
    dup = report_of(tmp_path / "s", "syn")["duplicates"]["file"]
    assert (dup["rows"], dup["identical"], dup["conflicting"], dup["rule"]) == (2, 1, 1, "first")
    assert sidecars(tmp_path / "s", "syn")[samples[5]["key"]] == f"c {samples[5]['key']}"
    rc, out = attach(capsys, *args, "--duplicates", "drop", "--min-coverage", "0.9")
    assert rc == 0 and samples[5]["key"] not in sidecars(tmp_path / "s", "syn")
    assert report_of(tmp_path / "s", "syn")["duplicates"]["file"]["dropped_keys"] == 1
    rc, out = attach(capsys, *args, "--duplicates", "error")
    assert rc == 1 and f"caps.jsonl: duplicate key {url!r} on row {len(samples) + 1} (first on row 6)" in out


def test_url_normalization() -> None:
    canonical = "https://images.example.com/a/b%20c.jpg"
    for spelling in (
        "HTTPS://Images.Example.COM/a/b%20c.jpg",
        "https://images.example.com:443/a/b%20c.jpg",
        "https://images.example.com/a/b%20c.jpg/",
        "https://images.example.com/a/b c.jpg",
        "https://images.example.com/%61/b%20c.jpg",
    ):
        assert normalize_url(spelling) == canonical, spelling
    assert normalize_url("http://x.org:8080/p?q=a%2fb") == "http://x.org:8080/p?q=a/b"
    assert normalize_url("https://x.org/IMG.JPG") == "https://x.org/IMG.JPG"  # paths keep their case


# ---------------------------------------------------------------------------------------------
# Coverage-aware p: the report, and p_mode=effective in the pipeline
# ---------------------------------------------------------------------------------------------


def test_p_mode_effective_realizes_p_where_coverage_allows(testbed_train: Path, tmp_path: Path, capsys, caplog) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    half = samples[::2]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"key": s["key"], "caption": "syn"}) + "\n" for s in half))
    rc, out = attach(
        capsys, "--shards", pattern, "--captions", str(tmp_path / "c.jsonl"), "--name", "half",
        "--min-coverage", "0.5", "--p", "0.3,0.8",
    )  # fmt: skip
    assert rc == 0
    assert "p=0.3: 0.1500 (effective draws 0.6000)" in out and "p=0.8: 0.4000 |" in out

    def share(p: float, mode: str) -> float:
        epochs = train_draws(pattern, Mixture.from_p(p, "half"), epochs=8, p_mode=mode)
        used = [src for epoch in epochs for _, _, src in epoch]
        return used.count("half") / len(used)

    assert abs(share(0.3, "paper") - 0.15) < 0.03  # p x coverage, over ~3000 draws
    assert abs(share(0.3, "effective") - 0.3) < 0.03
    with caplog.at_level(logging.WARNING):
        assert abs(share(0.8, "effective") - 0.5) < 0.01  # every sample draws the source; half have it
    assert "cannot realize a synthetic share of 0.8" in caplog.text and "half 0.5000" in caplog.text
    raised, why = effective_mixture(Mixture.from_p(0.3, "half"), {"half": 0.5})
    assert dict(raised.weights) == pytest.approx({"alt": 0.4, "half": 0.6}) and why is None

    from caption_mixing.coverage import CoverageError
    from caption_mixing.mixconfig import MixingFields, mixing_plan, validate_mixing

    with pytest.raises(CoverageError, match="no attach report .* lists these shards for it"):
        train_draws(pattern, Mixture.from_p(0.3, "altogether"), p_mode="effective")
    with pytest.raises(ValueError, match="p_mode: 'always' is not one of paper, effective"):
        validate_mixing(MixingFields(p_mode="always"))
    assert mixing_plan(MixingFields(p_mode="effective")).p_mode == "effective"


# ---------------------------------------------------------------------------------------------
# Shards in object storage: pipe: commands and fsspec URLs, sidecars local or remote
# ---------------------------------------------------------------------------------------------


def _url_captions(path: Path, samples: list[dict]) -> None:
    pq.write_table(
        pa.Table.from_pylist([{"url": s["meta"]["url"], "vlm_caption": f"remote {s['key']}"} for s in samples]), path
    )


def test_pipe_shards_attach_stats_and_training(testbed_train: Path, tmp_path: Path, capsys) -> None:
    pattern, samples = copy_shards(testbed_train, tmp_path / "s")
    _url_captions(tmp_path / "c.parquet", samples)
    piped = f"pipe:cat {pattern}"  # webdataset's pipe: URL; sidecars beside the file the command reads
    rc, out = attach(
        capsys, "--shards", piped, "--captions", str(tmp_path / "c.parquet"), "--join-on", "url",
        "--key-field", "url", "--caption-field", "vlm_caption", "--name", "piped",
    )  # fmt: skip
    assert rc == 0, out
    assert sidecars(tmp_path / "s", "piped")[samples[0]["key"]] == f"remote {samples[0]['key']}"
    draws = train_draws(piped, Mixture.from_p(1.0, "piped"))[0]
    assert len(draws) == len(samples) and {src for _, _, src in draws} == {"piped"}
    rc = cli(["stats", "--shards", piped, "--sources", "alt,piped", "--model", "EmbeddedCLIP-Tiny", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and f"| piped | {len(samples)} |" in out

    rc, out = attach(
        capsys, "--shards", "pipe:false", "--captions", str(tmp_path / "c.parquet"), "--name", "x",
        "--join-on", "url", "--key-field", "url", "--caption-field", "vlm_caption",
    )  # fmt: skip
    assert rc == 2 and "names no .tar file" in out and "--sidecar-dir" in out


def test_fsspec_shards_with_remote_and_local_sidecars(testbed_train: Path, tmp_path: Path, capsys) -> None:
    import fsspec

    _, samples = copy_shards(testbed_train, tmp_path / "s")
    fs = fsspec.filesystem("memory")
    for shard in sorted((tmp_path / "s").glob("*.tar")):
        fs.pipe(f"/bucket/cc/{shard.name}", shard.read_bytes())
    remote = "memory://bucket/cc/{00000..00003}.tar"
    _url_captions(tmp_path / "c.parquet", samples[:-10])
    common = ["--captions", str(tmp_path / "c.parquet"), "--format", "pixelprose", "--name", "cloud"]
    rc, out = attach(capsys, "--shards", remote, *common, "--sidecar-dir", "memory://bucket/side")
    assert rc == 0, out
    report = json.loads(fs.cat("/bucket/side/cloud.attach.json"))
    assert report["state"] == "installed" and report["matched"] == len(samples) - 10
    assert fs.exists("/bucket/side/00002.cloud.json") and not fs.glob("/bucket/side/.*staged")
    rc, out = attach(capsys, "--shards", remote, *common, "--sidecar-dir", "memory://bucket/side")
    assert rc == 0 and "are in place from an earlier run" in out  # the remote report resumes too

    rc, out = attach(capsys, "--shards", remote, *common)  # no sidecar_dir: beside the remote shards
    assert rc == 0 and fs.exists("/bucket/cc/00000.cloud.json")
    local = tmp_path / "local_side"
    rc, out = attach(capsys, "--shards", remote, *common, "--sidecar-dir", str(local))
    assert rc == 0 and (local / "00003.cloud.json").exists()

    for sidecar_dir in ("memory://bucket/side", str(local), None):
        draws = train_draws(remote, Mixture.from_p(1.0, "cloud"), sidecar_dir=sidecar_dir, p_mode="effective")[0]
        used = Counter(src for _, _, src in draws)
        assert used == {"cloud": len(samples) - 10, "alt": 10}, sidecar_dir
    file_url = f"file://{tmp_path / 's'}/{{00000..00003}}.tar"
    rc, out = attach(capsys, "--shards", file_url, *common)
    assert rc == 0 and (tmp_path / "s" / "00001.cloud.json").exists()
    fs.rm("/bucket", recursive=True)


# ---------------------------------------------------------------------------------------------
# A short CLIP run on the attached sources
# ---------------------------------------------------------------------------------------------


RELEASE_SOURCES = ("dreamlip", "capsfusion", "pixelprose", "recap", "vecap", "blip2", "dr", "la", "altogether")


def _every_release_shards(testbed_train: Path, folder: Path) -> tuple[str, list[dict]]:
    """One copy of the shards serving every release: img2dataset keys (LaCLIP's row join),
    DataComp's uid in the json, DataCompDR's syn.json member (absent for keys ending in 7)."""

    def meta(s: dict) -> dict:
        return {"uid": hashlib.md5(s["key"].encode()).hexdigest()}

    def syn(s: dict) -> dict:
        if s["key"].endswith("7"):
            return {}
        return {"syn.json": json.dumps({"syn_text": [f"syn {j} of {s['key']}" for j in range(5)]}).encode()}

    return copy_shards(testbed_train, folder, meta=meta, members=syn, img2dataset_keys=True)


def attach_every_release(capsys, pattern: str, samples: list[dict], tmp: Path) -> dict[str, dict[str, set[str]]]:
    """Every release's fixture attached to the same shards under its own source name; each attach's
    coverage report checked. Returns, per source, the captions a draw of each key may read."""
    files: dict[str, list[tuple[str, ...]]] = {}
    expect: dict[str, dict[str, set[str]]] = {}

    dl = write_dreamlip(tmp / "cc12m_3long_3short_1raw_captions_url.csv", covered(samples))
    files["dreamlip"] = [("--format", "dreamlip", "--captions", str(tmp / "cc12m_3long_3short_1raw_captions_url.csv"))]
    files["dreamlip"].append(("--columns", "dreamlip=shortIB_captions+longLLA_captions"))
    expect["dreamlip"] = {k: {v["shortIB_captions"], v["longLLA_captions"]} for k, v in dl.items()}

    def capsfusion(i: int, s: dict) -> dict:
        return {"image_url": s["meta"]["url"], "laion_2b": "alt", "laion_coco": "c", "capsfusion": f"fused {s['key']}"}

    def pixelprose(i: int, s: dict) -> dict:
        row = {"uid": f"pp{i}", "url": s["meta"]["url"], "key": str(i), "status": "success", "original_caption": "alt"}
        return {**row, "vlm_model": "gemini", "vlm_caption": f"prose {s['key']}"}

    def recap(i: int, s: dict) -> dict:  # another URL: only the sha256 of the image bytes finds the sample
        row = {"url": f"https://elsewhere.example.org/{i}.jpg", "re_caption": f"recap {s['key']}", "org_caption": "alt"}
        scores = {"re_clip_score": 0.3, "org_clip_score": 0.2}
        return {**row, "sha256": hashlib.sha256(s["jpg"]).hexdigest(), "key": f"{i:09d}", **scores}

    for name, fmt, every, row, prefix in (
        ("capsfusion", "capsfusion", 20, capsfusion, "fused"),
        ("pixelprose", "pixelprose", 4, pixelprose, "prose"),
        ("recap", "recap-datacomp", 10, recap, "recap"),
    ):
        release = covered(samples, every=every)
        pq.write_table(pa.Table.from_pylist([row(i, s) for i, s in enumerate(release)]), tmp / f"{name}.parquet")
        files[name] = [("--format", fmt, "--captions", str(tmp / f"{name}.parquet"))]
        expect[name] = {s["key"]: {f"{prefix} {s['key']}"} for s in release}

    vc = covered(samples, every=3)
    (tmp / "vecap.json").write_text(json.dumps({s["meta"]["url"]: f"VeCap {s['key']}" for s in vc}))
    files["vecap"] = [("--format", "vecap", "--captions", str(tmp / "vecap.json"))]
    expect["vecap"] = {s["key"]: {f"VeCap {s['key']}"} for s in vc}

    bl = covered(samples, every=6)
    with (tmp / "blip2_temp0.75.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["uid", "blip2-cap"], *([s["meta"]["uid"], f"blip2 {s['key']}"] for s in bl)])
    files["blip2"] = [("--format", "datacomp-blip2", "--captions", str(tmp / "blip2_temp0.75.csv"))]
    expect["blip2"] = {s["key"]: {f"blip2 {s['key']}"} for s in bl}

    files["dr"] = [("--format", "datacompdr")]
    expect["dr"] = {s["key"]: {f"syn {j} of {s['key']}" for j in range(5)} for s in samples if s["key"][-1] != "7"}

    write_laclip(tmp, samples)
    files["la"] = [("--format", "laclip", "--captions", str(tmp / "cc12m_*.txt"), "--original", str(tmp / "cc12m.tsv"))]
    files["la"].append(("--rows-per-shard", "96"))
    styles = ("chatgpt", "bard", "mscoco", "human")
    expect["la"] = {s["key"]: {f"{style} rewrite of {s['key']}" for style in styles} for s in samples}

    mc = [s for s in samples if s["key"][-1] not in "05"]  # sidecars {cap_dir}/{shard % 100}/{shard}.json
    for shard in range(4):
        (tmp / "mc" / str(shard)).mkdir(parents=True)
        own = {s["key"]: f"altogether {s['key']}" for s in mc if s["shard"] == f"{shard:05d}.tar"}
        (tmp / "mc" / str(shard) / f"{shard}.json").write_text(json.dumps(own))
    files["altogether"] = [("--format", "metaclip", "--captions", str(tmp / "mc"))]
    expect["altogether"] = {s["key"]: {f"altogether {s['key']}"} for s in mc}

    assert {parts[0][1] for parts in files.values()} == set(RELEASES)  # every format attach reads as released
    for name in RELEASE_SOURCES:
        named = () if name == "dreamlip" else ("--name", name)
        rc, out = attach(capsys, "--shards", pattern, *(a for part in files[name] for a in part), *named)
        assert rc == 0, (name, out)
        c = report_of(Path(pattern).parent, name)["sources"][name]
        assert (c["matched"], c["missing"]) == (len(expect[name]), len(samples) - len(expect[name])), name
        assert c["coverage"] == pytest.approx(len(expect[name]) / len(samples)), name
    return expect


def test_clip_trains_on_every_release_format(testbed_train: Path, tmp_path: Path, capsys) -> None:
    """Every release format attached to one copy of the shards, read by the pipeline (each drawn caption
    is its fixture's caption for that key) and by one short CLIP run (each source used)."""
    from clip_train.config import load_config
    from clip_train.train import train
    from training.checkpoint import load_checkpoint

    pattern, samples = _every_release_shards(testbed_train, tmp_path / "s")
    expect = attach_every_release(capsys, pattern, samples, tmp_path)
    alt = {s["key"]: s["txt"].decode() for s in samples}
    captions = ",".join(["alt=0.28", *(f"{n}=0.08" for n in RELEASE_SOURCES)])
    draws = train_draws(pattern, Mixture.parse(captions), p_mode="effective")[0]
    assert len(draws) == len(samples)
    for key, caption, source in draws:  # the right text: the fixture's caption for that key and source
        assert caption in (expect[source].get(key, ()) if source != "alt" else {alt[key]}), (key, source, caption)
    assert set(RELEASE_SOURCES) <= {source for _, _, source in draws}

    overrides = {"batch_size": 32, "samples_seen": 6 * 32, "workers": 0, "checkpoint_every": 100, "log_every": 2}
    overrides.update(warmup_steps=2, captions=captions, p_mode="effective")
    cfg = load_config("embedded", overrides)
    state = load_checkpoint(train(cfg, tmp_path / "run", pattern, num_samples=len(samples)))
    used = state["mixing"]["used"]
    assert state["step"] == 6 and sum(used.values()) == 6 * 32
    assert all(used.get(n, 0) > 0 for n in RELEASE_SOURCES), used
