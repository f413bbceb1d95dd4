"""Splits (issue 14, item 2): SUN397, Caltech-101 and EuroSAT come from published wds test splits, a builder
folder that would score the whole dataset is refused naming what to get, and every result records its split,
sample count and the standard split's size, flagging a difference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eval.__main__ import main
from eval.locate import locate
from eval.preflight import check_tasks
from eval.prompts import packaged_classnames
from eval.runner import run_suite
from eval.tasks import PAPER_TASKS, REGISTRY, looked_for, parse_task_spec
from eval.wds_folder import shard_labels
from tests.test_eval import clip  # noqa: F401  (the tiny random CLIP fixture)
from tests.test_eval_prompts import write_class_folder

WHOLE_SET = {"sun397": "wds_sun397", "caltech101": "wds_vtab-caltech101", "eurosat": "wds_vtab-eurosat"}


def test_the_three_tasks_read_published_wds_test_splits_only(tmp_path):
    for name, wds in WHOLE_SET.items():
        task = REGISTRY[name]
        assert task.splits == ("test",) and not task.builder, name
        assert looked_for(task, tmp_path) == [tmp_path / wds], name  # never the builder folder
    # every other builder-backed task: clip_benchmark's builder honours split="test" (it asserts on the
    # split names it knows and passes the split on); only these three ignore it
    assert {t.name for t in PAPER_TASKS if t.refuse_folder} == set(WHOLE_SET)
    assert all(t.expected_samples for t in PAPER_TASKS if t.name != "kinetics700")


def test_a_builder_folder_that_would_score_the_whole_set_is_refused(clip, tmp_path):  # noqa: F811
    model, tokenizer, preprocess = clip
    for raw in WHOLE_SET:
        (tmp_path / raw / "data").mkdir(parents=True)  # what clip_benchmark's builder would read, whole
    problems = check_tasks(parse_task_spec("sun397,caltech101,eurosat"), tmp_path, keep_going=True)
    assert len(problems) == 3
    for problem, (name, wds) in zip(problems, WHOLE_SET.items(), strict=True):
        assert problem.startswith(f"{name}: only {tmp_path / name} is present") and "ignores the split" in problem
        assert f"https://huggingface.co/datasets/clip-benchmark/{wds}) into {tmp_path / wds}" in problem
    assert "prepare sun397" in problems[0]
    with pytest.raises(ValueError, match=r"eurosat: only .* the whole dataset; get .*wds_vtab-eurosat"):
        run_suite(model, tokenizer, preprocess, parse_task_spec("eurosat"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="wds_vtab-eurosat"):
        locate(REGISTRY["eurosat"], tmp_path, download=True)  # --download does not bring the builder back
    res = run_suite(model, tokenizer, preprocess, parse_task_spec("caltech101"), tmp_path, keep_going=True)
    assert (
        res["tasks"]["caltech101"]["status"] == "error" and "wds_vtab-caltech101" in res["tasks"]["caltech101"]["error"]
    )


def test_results_record_split_count_and_flag_a_different_count(clip, tmp_path):  # noqa: F811
    model, tokenizer, preprocess = clip
    eurosat = packaged_classnames("eurosat")[0]
    write_class_folder(tmp_path / "wds_vtab-eurosat", eurosat, per_class=2)
    write_class_folder(tmp_path / "wds_sun397", ["abbey", "airplane cabin", "alley"], per_class=2)
    (tmp_path / "eurosat").mkdir()  # a builder folder beside the wds one: the wds is read, nothing refused
    suite = run_suite(model, tokenizer, preprocess, parse_task_spec("eurosat,sun397"), tmp_path, progress=False)
    eu, sun = suite["tasks"]["eurosat"], suite["tasks"]["sun397"]
    assert (eu["split"], eu["num_samples"], eu["expected_samples"]) == ("test", 20, 5400)
    assert eu["path"] == str(tmp_path / "wds_vtab-eurosat") and eu["prompt_source"] == "metaclip"
    assert eu["size_note"] == f"the standard test split has 5400 images; {tmp_path / 'wds_vtab-eurosat'} has 20"
    assert "prompt_note" not in eu  # MetaCLIP's 10 EuroSAT names are clip_benchmark's, in the same order
    assert sun["num_samples"] == 6 and sun["expected_samples"] == 19850
    assert "108,754" in sun["size_note"] and "prepare sun397" in sun["size_note"]
    assert "MetaCLIP's list has 397 classes" in sun["prompt_note"]  # 3 classes here: the folder's names


def _jpeg(color: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_prepare_sun397_writes_the_partition_1_test_split(tmp_path, capsys):
    src = tmp_path / "sun397"
    images = {"/a/abbey/sun_a.jpg": 10, "/a/abbey/sun_b.jpg": 20, "/a/apse/indoor/sun_c.jpg": 30,
              "/b/bedroom/sun_d.jpg": 40}  # fmt: skip
    for rel, color in images.items():
        path = src / "SUN397" / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(color))
    (src / "Partitions").mkdir()
    (src / "Partitions" / "ClassName.txt").write_text("/a/abbey\n/a/apse/indoor\n/b/bedroom\n")
    (src / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_b.jpg\n")
    (src / "Partitions" / "Testing_01.txt").write_text(
        "/b/bedroom/sun_d.jpg\n/a/abbey/sun_a.jpg\n/a/apse/indoor/sun_c.jpg\n"
    )
    out = tmp_path / "root" / "wds_sun397"
    assert main(["prepare", "sun397", "--source", str(src), "--out", str(out)]) == 0
    assert (out / "classnames.txt").read_text().splitlines() == ["abbey", "apse indoor", "bedroom"]
    assert shard_labels(out / "test" / "0.tar") == [2, 0, 1]  # Testing_01 order, label = line of ClassName.txt
    assert check_tasks(parse_task_spec("sun397"), tmp_path / "root") == []
    (src / "Partitions" / "Testing_01.txt").write_text("/c/castle/sun_x.jpg\n")
    assert main(["prepare", "sun397", "--source", str(src), "--out", str(tmp_path / "again")]) == 2
    assert "/c/castle/sun_x.jpg is in no class of" in capsys.readouterr().err
