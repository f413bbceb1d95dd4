"""Tests for the synthetic testbed package (testbed) and its tiny open_clip model config (testbed.models).

Everything is built at a tiny size into tmp folders; the numbers here say nothing about CLIP.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import testbed.cache
from caption_mixing.__main__ import main as caption_mixing_main
from caption_mixing.sidecar import read_sidecar, sidecar_path
from testbed import (
    CATEGORIES,
    CATEGORY_PLURALS,
    COLORS,
    CONCEPTS,
    EVAL_TASKS,
    FINE_TASKS,
    GENERATOR_VERSION,
    SYNTHETIC_SOURCES,
    Testbed,
    TestbedConfig,
    build_testbed,
    default_testbed_root,
    ensure_testbed,
    load_testbed,
)
from testbed.cli import add_cli_arguments, cli

REPO = Path(__file__).resolve().parent.parent

TINY = TestbedConfig(num_train=240, shard_size=60, eval_per_class=2, eval_per_class_small=3, num_retrieval=10, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Testbed:
    return build_testbed(tmp_path_factory.mktemp("tb") / "testbed", TINY, progress=False)


def _shards(tb: Testbed) -> list[Path]:
    return sorted((tb.root / "train").glob("*.tar"))


def _train_samples(tb: Testbed) -> list[dict]:
    """All train samples with alt-text, metadata and both sidecar captions (None when absent)."""
    out = []
    for shard in _shards(tb):
        caps = {src: read_sidecar(sidecar_path(shard, src), shard) for src in SYNTHETIC_SOURCES}
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            key = s["__key__"]
            out.append(
                {
                    "key": key,
                    "alt": s["txt"].decode("utf-8"),
                    "meta": json.loads(s["json"]),
                    **{src: caps[src].get(key) for src in SYNTHETIC_SOURCES},
                }
            )
    return out


_NAME_RES = {
    c.name: re.compile(r"\b(" + re.escape(c.name) + "|" + re.escape(c.plural) + r")\b", re.IGNORECASE) for c in CONCEPTS
}


def _species_in(text: str) -> set[str]:
    return {name for name, rx in _NAME_RES.items() if rx.search(text)}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_config_fingerprint() -> None:
    assert TINY.fingerprint() == TestbedConfig(**vars(TINY)).fingerprint()
    assert TINY.fingerprint() != TestbedConfig(**{**vars(TINY), "seed": 1}).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{12}", TINY.fingerprint())


def test_world_is_well_formed() -> None:
    assert len(CONCEPTS) == 64 and len(CATEGORIES) == 8 and len(COLORS) == 8
    names = [c.name for c in CONCEPTS]
    assert len(set(names)) == 64
    # No species name hides inside another species name or a category word, or detection is ambiguous.
    for c in CONCEPTS:
        others = [o for o in CONCEPTS if o is not c]
        assert not any(_NAME_RES[c.name].search(o.name) or _NAME_RES[c.name].search(o.plural) for o in others)
        assert not any(_NAME_RES[c.name].search(cat) for cat in CATEGORIES)


def test_eval_mix_is_mostly_long_tail_concepts_like_the_papers_average() -> None:
    from eval.tasks import TASK_SETS, TESTBED_GROUPS

    concept_tasks = [t for t in EVAL_TASKS if t == "concept" or t in FINE_TASKS]
    assert len(concept_tasks) >= len(EVAL_TASKS) / 2
    # The report groups split the testbed's tasks exactly: concepts / attributes / retrieval.
    grouped = [t for members in TESTBED_GROUPS.values() for t in members]
    assert sorted(grouped) == sorted(EVAL_TASKS) and TESTBED_GROUPS["concepts"] == tuple(concept_tasks)
    assert TASK_SETS["testbed"] == EVAL_TASKS
    # Default sizes: ~1000 images or more per task, so sampling alone moves a task by well under 2 points.
    assert min(TestbedConfig().eval_sizes().values()) >= 1000


def test_deterministic_bytes(built: Testbed, tmp_path: Path) -> None:
    again = build_testbed(tmp_path / "again", TINY, progress=False)
    a, b = _all_files(built.root), _all_files(again.root)
    assert a.keys() == b.keys()
    for name in a:
        if name == "testbed.json":
            continue
        assert a[name] == b[name], name
    ma, mb = built.manifest(), again.manifest()
    ma.pop("build_seconds"), mb.pop("build_seconds")
    assert ma == mb


def test_different_seed_differs(built: Testbed, tmp_path: Path) -> None:
    other = build_testbed(tmp_path / "other", TestbedConfig(**{**vars(TINY), "seed": 1}), progress=False)
    assert (other.root / "train/00000.tar").read_bytes() != (built.root / "train/00000.tar").read_bytes()


def test_manifest_and_handle(built: Testbed) -> None:
    doc = built.manifest()
    assert doc["notice"].startswith("Synthetic testbed")
    assert doc["fingerprint"] == TINY.fingerprint() and doc["generator_version"] == GENERATOR_VERSION
    assert built.train_shards == str(built.root / "train/{00000..00003}.tar")
    assert built.num_train == 240 and built.synthetic_sources == SYNTHETIC_SOURCES
    assert tuple(built.eval_tasks) == EVAL_TASKS
    assert all(p.is_dir() and p.is_relative_to(built.root) for p in built.eval_tasks.values())
    assert Testbed.load(built.root) == built
    assert sum(doc["train"]["concept_counts"].values()) == 240
    assert sum(doc["train"]["alt_kind_counts"].values()) == 240


def test_train_layout(built: Testbed) -> None:
    shards = _shards(built)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    missing_total = empty_total = 0
    for si, shard in enumerate(shards):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        assert all(m.mtime == members[0].mtime and m.uid == 0 and m.uname == "testbed" for m in members)
        keys = [m.name.split(".")[0] for m in members[::3]]
        assert keys == [f"{si:05d}{i:04d}" for i in range(60)]
        assert [m.name for m in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
        scratch = read_sidecar(sidecar_path(shard, "scratch"), shard)
        altogether = read_sidecar(sidecar_path(shard, "altogether"), shard)
        assert list(scratch) == keys and all(scratch.values())
        assert set(altogether) <= set(keys)
        missing_total += len(keys) - len(altogether)
        empty_total += sum(1 for v in altogether.values() if v == "")
    stats = built.manifest()["train"]["sidecars"]["altogether"]
    assert (stats["missing"], stats["empty"]) == (missing_total, empty_total)
    assert stats["captions"] == 240 - missing_total - empty_total


def test_gap_rates_and_long_tail(tmp_path: Path) -> None:
    """At 2000 samples the ~1% missing / ~0.5% empty altogether gaps and the Zipf tail are visible."""
    cfg = TestbedConfig(
        num_train=2000, shard_size=1000, image_size=32, eval_per_class=1, eval_per_class_small=1, num_retrieval=1
    )
    doc = build_testbed(tmp_path / "tb", cfg, progress=False).manifest()
    st = doc["train"]["sidecars"]["altogether"]
    assert 5 <= st["missing"] <= 40 and 2 <= st["empty"] <= 25
    kinds = doc["train"]["alt_kind_counts"]
    assert 0.48 < kinds["correct"] / 2000 < 0.62 and 0.10 < kinds["wrong"] / 2000 < 0.20
    counts = sorted(doc["train"]["concept_counts"].values())
    assert counts[-1] > 10 * max(counts[0], 1)  # long tail


def test_train_metadata_and_images(built: Testbed) -> None:
    samples = _train_samples(built)
    assert len(samples) == 240
    for s in samples[:80]:
        m = s["meta"]
        assert m["key"] == s["key"] and m["status"] == "success" and m["error_message"] is None
        assert m["caption"] == s["alt"] and m["url"].startswith("https://images.example.com/")
        assert (m["width"], m["height"]) == (64, 64) and m["original_width"] > 0 and m["original_height"] > 0
        tb = m["testbed"]
        assert {"concept", "category", "color", "count", "position", "background", "alt_kind"} <= set(tb)
        concept = next(c for c in CONCEPTS if c.name == tb["concept"])
        assert tb["category"] == concept.category and tb["color"] in COLORS and 1 <= tb["count"] <= 4
        assert (tb["position"] is None) == (tb["count"] > 1)
        assert tb["alt_kind"] in ("correct", "wrong", "none")
    ds = wds.WebDataset(built.train_shards, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    n = 0
    for img, txt, meta in ds:
        assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
        assert isinstance(txt, str) and isinstance(meta, dict)
        n += 1
    assert n == 240
    first = next(iter(wds.WebDataset(built.train_shards, shardshuffle=False)))
    arr = np.asarray(Image.open(io.BytesIO(first["jpg"])))
    assert arr.std() > 10  # not a blank image


def test_caption_properties(built: Testbed) -> None:
    samples = _train_samples(built)
    alt_len = [len(s["alt"].split()) for s in samples]
    dense = [s["altogether"] for s in samples if s["altogether"]]
    assert all(3 <= n <= 12 for n in alt_len)
    assert all(25 <= len(c.split()) <= 45 for c in dense + [s["scratch"] for s in samples])
    assert np.mean(alt_len) * 3 < np.mean([len(c.split()) for c in dense])
    kept = correct = 0
    for s in samples:
        truth = s["meta"]["testbed"]
        kind, concept = truth["alt_kind"], truth["concept"]
        alt_species = _species_in(s["alt"])
        if kind == "correct":
            assert alt_species == {concept}, s["alt"]
        elif kind == "wrong":
            assert len(alt_species) == 1 and concept not in alt_species, s["alt"]
        else:
            assert not alt_species, s["alt"]
        assert not _species_in(s["scratch"]), s["scratch"]
        assert truth["category"] in s["scratch"] or CATEGORY_PLURALS[truth["category"]] in s["scratch"]
        if s["altogether"]:
            found = _species_in(s["altogether"])
            assert found <= {concept}, s["altogether"]  # never the wrong name
            if found:
                assert kind == "correct", s
            if kind == "correct":
                correct += 1
                kept += bool(found)
            assert f" {truth['color']} " in s["altogether"]
    assert correct > 0 and kept / correct >= 0.75  # ~90% keep the name, ~10% fall back to the category


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def test_eval_sets_load_with_clip_benchmark(built: Testbed) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    sizes = TINY.eval_sizes()
    for task in EVAL_TASKS:
        root = built.eval_tasks[task]
        assert (root / "test" / "nshards.txt").read_text().strip() == "1"
        if task == "retrieval":
            ds = build_dataset(
                f"wds/{task}", root=str(root), transform=_to_array, split="test", task="zeroshot_retrieval"
            )
            items = list(ds)
            assert len(items) == sizes[task]
            for img, caps in items:
                assert img.shape == (64, 64, 3) and 1 <= len(caps) <= 2
            assert all(any(_species_in(c) for c in caps) for _, caps in items)
            continue
        ds = build_dataset(f"wds/{task}", root=str(root), transform=_to_array, split="test")
        assert ds.templates and all("{c}" in t for t in ds.templates)
        labels = [int(label) for img, label in ds]
        assert len(labels) == sizes[task]
        assert sorted(set(labels)) == list(range(len(ds.classes)))
        assert len(set(np.bincount(labels))) == 1  # balanced
    concept_classes = (built.eval_tasks["concept"] / "classnames.txt").read_text().splitlines()
    assert concept_classes == [c.name for c in CONCEPTS]
    # One 8-way fine-grained task per category: its species, and only its species, in pattern order.
    assert FINE_TASKS == tuple(f"concept_{cat}" for cat in CATEGORIES)
    for task, cat in zip(FINE_TASKS, CATEGORIES, strict=True):
        names = (built.eval_tasks[task] / "classnames.txt").read_text().splitlines()
        assert names == [c.name for c in CONCEPTS if c.category == cat]
        for s in wds.WebDataset(str(built.eval_tasks[task] / "test/0.tar"), shardshuffle=False):
            assert int(s["cls"]) < 8
    assert (built.eval_tasks["count"] / "classnames.txt").read_text().split() == ["one", "two", "three", "four"]


def test_eval_images_differ_from_train(built: Testbed) -> None:
    """Eval images come from their own RNG stream, so no eval image is a copy of a train image."""
    train_jpgs = {s["jpg"] for s in wds.WebDataset(built.train_shards, shardshuffle=False)}
    eval_jpgs = {s["jpg"] for s in wds.WebDataset(str(built.eval_tasks["concept"] / "test/0.tar"), shardshuffle=False)}
    assert not train_jpgs & eval_jpgs


def test_ensure_reuses_and_rebuilds(built: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "copy"
    shutil.copytree(built.root, root)
    manifest, shard = root / "testbed.json", root / "train/00000.tar"
    before = (manifest.stat().st_mtime_ns, shard.stat().st_mtime_ns)
    tb = ensure_testbed(root, TINY, progress=False)
    assert "reusing" in capsys.readouterr().out
    assert (manifest.stat().st_mtime_ns, shard.stat().st_mtime_ns) == before
    assert tb.config == TINY

    other = TestbedConfig(**{**vars(TINY), "num_train": 120, "seed": 3})
    tb2 = ensure_testbed(root, other, progress=False)
    assert "building" in capsys.readouterr().out
    assert tb2.config == other and tb2.manifest()["fingerprint"] == other.fingerprint()
    # Stale shards of the previous, larger build are gone.
    assert sorted(p.name for p in (root / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]

    manifest.unlink()  # a killed build has no manifest: it must be rebuilt
    ensure_testbed(root, other, progress=False)
    assert "building" in capsys.readouterr().out and manifest.exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="testbed.json"):
        Testbed.load(tmp_path)
    (tmp_path / "testbed.json").write_text("{not json")
    with pytest.raises(ValueError, match="testbed.json"):
        Testbed.load(tmp_path)
    (tmp_path / "testbed.json").write_text(json.dumps({"config": {"bogus": 1}}))
    with pytest.raises(ValueError, match="testbed.json"):
        Testbed.load(tmp_path)


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.txt"):
        build_testbed(tmp_path, TINY, progress=False)
    assert (tmp_path / "precious.txt").exists()


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPTION_MIXING_CACHE", str(tmp_path))
    assert default_testbed_root(TINY) == tmp_path / f"testbed-{TINY.fingerprint()}"
    monkeypatch.delenv("CAPTION_MIXING_CACHE")
    assert default_testbed_root(TINY) == Path.home() / ".cache/caption_mixing" / f"testbed-{TINY.fingerprint()}"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    argv = ["--out", str(tmp_path / "tb"), "--num-train", "100", "--shard-size", "50", "--image-size", "32"]
    assert cli(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "building" in out and "not paper results" in out
    tb = Testbed.load(tmp_path / "tb")
    assert tb.num_train == 100 and tb.config.image_size == 32 and tb.config.seed == 0
    assert cli(parser.parse_args(argv)) == 0
    assert "reusing" in capsys.readouterr().out
    assert cli(parser.parse_args([*argv, "--force"])) == 0
    assert "--force" in capsys.readouterr().out


def test_load_testbed_uses_a_built_folder_as_is(
    built: Testbed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with a manifest is used as built, whatever its config; anything else goes to ensure_testbed."""
    shard = built.root / "train/00000.tar"
    before = shard.stat().st_mtime_ns
    assert load_testbed(built.root) == built and load_testbed(str(built.root)) == built
    assert shard.stat().st_mtime_ns == before and "building" not in capsys.readouterr().out
    calls: list[object] = []
    monkeypatch.setattr(testbed.cache, "ensure_testbed", lambda root: calls.append(root) or "ensured")
    assert load_testbed(None) == "ensured" and load_testbed(built.root / "missing") == "ensured"
    assert calls == [None, built.root / "missing"]


def test_module_entry_points_refuse_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m testbed` and `python -m caption_mixing testbed` run the same CLI; errors name the file, exit 2."""
    (tmp_path / "precious.txt").write_text("keep me")
    run = subprocess.run(
        [sys.executable, "-m", "testbed", "--out", str(tmp_path), "--num-train", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "precious.txt" in run.stderr, run.stderr
    assert caption_mixing_main(["testbed", "--out", str(tmp_path / "tb"), "--num-train", "0"]) == 2
    assert "num_train" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me" and not (tmp_path / "testbed.json").exists()


def _fresh_python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_import_testbed_models_registers_the_tiny_clip() -> None:
    out = _fresh_python(
        "import open_clip\n"
        "assert 'EmbeddedCLIP-Tiny' not in open_clip.list_models()\n"
        "import testbed, testbed.models as m\n"
        "assert m.EMBEDDED_CLIP_MODEL in open_clip.list_models()\n"
        "assert m.register() == m.register() == ['EmbeddedCLIP-Tiny']\n"
        "model = open_clip.create_model(m.EMBEDDED_CLIP_MODEL)\n"
        "print(model.visual.image_size, model.text_projection.shape[1])\n"
    )
    assert out.split() == ["64", "128"]


def test_eval_knows_the_tiny_clip_without_a_config_dir() -> None:
    """`python -m eval zeroshot --model EmbeddedCLIP-Tiny` needs no --model-config-dir."""
    out = _fresh_python("import open_clip, eval.model_loading\nprint('EmbeddedCLIP-Tiny' in open_clip.list_models())")
    assert out.strip() == "True"
