"""Task registry: the paper's 26 tasks, metrics, task-list parsing and `python -m eval tasks`."""

from __future__ import annotations

import pytest

from eval.__main__ import main
from eval.prompts import folder_prompts, packaged_classnames, packaged_templates
from eval.tasks import DATACOMP_GROUPS, PAPER_TASKS, REGISTRY, TASK_SETS, looked_for, resolve_tasks

PAPER_COLUMNS = ["ImageNet", "Food-101", "CIFAR10", "CIFAR100", "CUB", "SUN397", "Cars", "Aircraft", "DTD", "Pets",
                 "Caltech-101", "Flowers", "MNIST", "FER-2013", "STL-10", "EuroSAT", "RESISC45", "GTSRB", "KITTI",
                 "Country211", "PCAM", "UCF101", "Kinetics700", "CLEVR", "HatefulMemes", "SST2"]  # fmt: skip


def test_paper_columns_and_metrics():
    assert [t.title for t in PAPER_TASKS] == PAPER_COLUMNS
    metric = {t.title: t.metric for t in PAPER_TASKS}
    assert {k for k, v in metric.items() if v == "mean_per_class_recall"} == {
        "Aircraft",
        "Pets",
        "Caltech-101",
        "Flowers",
    }
    assert metric["Kinetics700"] == "top1_top5_mean" and metric["HatefulMemes"] == "roc_auc"
    assert sum(v == "acc1" for v in metric.values()) == 20
    assert REGISTRY["eurosat"].paper_split == "val"
    assert REGISTRY["resisc45"].wds_dirs[0] == "wds_vtab-resisc45"
    assert REGISTRY["sst2"].cb_name == "renderedsst2" and REGISTRY["cub"].cb_name is None
    assert all(m in REGISTRY for ms in DATACOMP_GROUPS.values() for m in ms if m != "winogavil")


def test_every_paper_task_has_templates_and_the_new_ones_have_data_files():
    for t in PAPER_TASKS:
        assert packaged_templates(t.prompt_key), t.name
    ucf = packaged_classnames("ucf101")[0]
    assert len(ucf) == 101 and len(set(ucf)) == 101 and "Yo Yo" in ucf
    assert packaged_classnames("hateful_memes")[0] == ["meme", "hatespeech meme"]
    assert len(packaged_templates("ucf101")[0]) == 48 and len(packaged_templates("kinetics700")[0]) == 28
    assert packaged_templates("cub")[0] == ["a photo of a {c}, a type of bird."]


def test_folder_prompts_prefer_the_folder_then_packaged(tmp_path):
    names, templates, src = folder_prompts(tmp_path, "hateful_memes")
    assert names == ["meme", "hatespeech meme"] and templates == ["a {c}."] and src["templates"].endswith(".json")
    (tmp_path / "classnames.txt").write_text("a\nb\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="zeroshot_classification_templates.txt.*{c}"):
        folder_prompts(tmp_path, "hateful_memes")
    with pytest.raises(ValueError, match="classnames.txt"):
        folder_prompts(tmp_path / "nowhere", "no_such_key")


def test_resolve_tasks_sets_names_and_typos():
    assert [t.name for t in resolve_tasks("paper26")] == [t.name for t in PAPER_TASKS]
    assert [t.name for t in resolve_tasks("retrieval,imagenet1k,flickr30k")] == ["flickr30k", "mscoco", "imagenet1k"]
    assert "winogavil" not in TASK_SETS["datacomp"]
    with pytest.raises(ValueError, match="did you mean cifar100"):
        resolve_tasks("imagenet1k,cifar1000")
    with pytest.raises(ValueError, match="names no task"):
        resolve_tasks(" , ")


def test_tasks_command_prints_registry(tmp_path, capsys):
    assert main(["tasks", "--dataset-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(top-1 + top-5) / 2" in out and "ROC AUC" in out and "mean per-class accuracy" in out
    assert str(tmp_path / "wds_vtab-kitti_closest_vehicle_distance") in out
    assert str(tmp_path / "cifar10") in out  # clip_benchmark's builder folder is also looked at
    assert "dev (as test/)" in out  # HatefulMemes: the original split `prepare` stores as test/
    lines = [ln.split()[1] for ln in out.splitlines() if ln[:1].isdigit()][:26]
    assert lines == [t.name for t in PAPER_TASKS]
    assert looked_for(REGISTRY["cub"], tmp_path) == [tmp_path / "wds_cub"]
