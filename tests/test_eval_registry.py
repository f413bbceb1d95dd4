"""Task registry: the paper's 26 tasks, metrics, task-spec parsing and `python -m eval tasks`."""

from __future__ import annotations

import pytest

from eval.__main__ import main
from eval.locate import locate
from eval.prompts import folder_prompts, packaged_classnames, packaged_templates
from eval.tasks import DATACOMP_GROUPS, PAPER_TASKS, REGISTRY, TASK_SETS, looked_for, parse_task_spec
from testbed import EVAL_TASKS

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
    assert REGISTRY["eurosat"].paper_split == "test" and REGISTRY["eurosat"].wds_dirs == ("wds_vtab-eurosat",)
    assert REGISTRY["resisc45"].wds_dirs[0] == "wds_vtab-resisc45"
    assert REGISTRY["sst2"].cb_name == "renderedsst2" and REGISTRY["cub"].cb_name is None
    assert all(m in REGISTRY for ms in DATACOMP_GROUPS.values() for m in ms)  # WinoGAViL included
    assert REGISTRY["winogavil"].metric == "jaccard_score_10-12" and REGISTRY["winogavil"].kind == "association"


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


def test_parse_task_spec_groups_names_and_typos():
    assert [t.name for t in parse_task_spec("paper26")] == [t.name for t in PAPER_TASKS]
    retrieval = ["flickr30k", "mscoco", "winogavil"]  # DataComp's Retrieval group
    assert [t.name for t in parse_task_spec("retrieval,imagenet1k,flickr30k")] == [*retrieval, "imagenet1k"]
    assert "winogavil" in TASK_SETS["datacomp"]
    assert [t.name for t in parse_task_spec("datacomp")] == list(TASK_SETS["datacomp"])
    with pytest.raises(ValueError, match="--tasks: unknown task 'cifar1000'; did you mean cifar100"):
        parse_task_spec("imagenet1k,cifar1000")
    with pytest.raises(ValueError, match="--extra-task: unknown task 'flowerz'"):
        parse_task_spec("flowerz", "--extra-task")
    with pytest.raises(ValueError, match="names no task"):
        parse_task_spec(" , ")


def test_testbed_group_reads_the_testbeds_eval_folders(tmp_path):
    tasks = parse_task_spec("testbed")
    assert tuple(t.name for t in tasks) == EVAL_TASKS  # the testbed's own list, by name and order
    metrics = {t.name: (t.kind, t.metric) for t in tasks}
    assert metrics["retrieval"] == ("retrieval", "mean_recall@1") and metrics["concept"] == ("classification", "acc1")
    assert looked_for(REGISTRY["concept"], tmp_path) == [tmp_path / "concept"]  # <testbed>/eval/<name>/
    (tmp_path / "count" / "test").mkdir(parents=True)
    assert locate(REGISTRY["count"], tmp_path).path == tmp_path / "count"
    # a group name wins: `retrieval` alone is Flickr30k + COCO + WinoGAViL, the testbed's set comes with `testbed`
    assert [t.name for t in parse_task_spec("retrieval")] == ["flickr30k", "mscoco", "winogavil"]


def test_parse_task_spec_adhoc_items(tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "dataset_type.txt").write_text("retrieval\n")
    mine, pairs, air, color = parse_task_spec(
        f"mine={tmp_path / 'a'}, pairs={tmp_path / 'pairs'},fgvc_aircraft={tmp_path / 'air'},color={tmp_path / 'c'}"
    )
    assert (mine.kind, mine.metric, mine.local_path) == ("classification", "acc1", str(tmp_path / "a"))
    assert (pairs.kind, pairs.metric) == ("retrieval", "mean_recall@1")
    # a registry name read from a given folder keeps the registry's metric, prompts and splits
    assert (air.metric, air.prompt_key, air.title) == ("mean_per_class_recall", "fgvc_aircraft", "Aircraft")
    assert air.local_path == str(tmp_path / "air") and looked_for(air, None) == [tmp_path / "air"]
    assert (color.metric, color.local_path) == ("acc1", str(tmp_path / "c"))
    eurosat = parse_task_spec(f"eurosat={tmp_path / 'eu'}")[0]
    (tmp_path / "eu" / "test").mkdir(parents=True)  # EuroSAT: the published VTAB test split
    assert locate(eurosat, None).split == "test" and not locate(eurosat, None).split_note
    # the same task twice is merged; one name with two sources is refused
    assert [t.name for t in parse_task_spec("cifar10,paper26")][:2] == ["cifar10", "imagenet1k"]
    with pytest.raises(ValueError, match="'cifar10' is given twice"):
        parse_task_spec(f"cifar10,cifar10={tmp_path}")


@pytest.mark.parametrize("item", ["../x=DIR", "a/b=DIR", ".hidden=DIR", "=DIR", "x=", "paper26=DIR", "te st=DIR"])
def test_parse_task_spec_refuses_bad_adhoc_names(item, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--extra-task"):
        parse_task_spec(item, "--extra-task")
    assert not any(tmp_path.iterdir())


def test_tasks_command_prints_registry(tmp_path, capsys):
    assert main(["tasks", "--dataset-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(top-1 + top-5) / 2" in out and "ROC AUC" in out and "mean per-class accuracy" in out
    assert str(tmp_path / "wds_vtab-kitti_closest_vehicle_distance") in out
    assert str(tmp_path / "cifar10") in out  # clip_benchmark's builder folder is also looked at
    assert "dev (as test/)" in out  # HatefulMemes: the original split `prepare` stores as test/
    rows = {ln.split()[1]: ln for ln in out.splitlines() if ln[:1].isdigit()}
    assert [ln.split()[1] for ln in out.splitlines() if ln[:1].isdigit()][:26] == [t.name for t in PAPER_TASKS]
    assert looked_for(REGISTRY["cub"], tmp_path) == [tmp_path / "wds_cub"]
    # per task: the split, the standard split's size and where the prompts come from (issue 14)
    assert "metaclip:FacialEmotionRecognition2013 (7 classes, 12 names x 6 templates)" in rows["fer2013"]
    assert " test " in rows["eurosat"] and " 5,400 " in rows["eurosat"] and "wds_vtab-eurosat" in rows["eurosat"]
    assert f"(refused: {tmp_path / 'sun397'})" in rows["sun397"] and " 19,850 " in rows["sun397"]
    assert "'A/An <cue>' (DataComp)" in rows["winogavil"] and " 3,563 " in rows["winogavil"]
    assert "folder files" in rows["concept"]
    assert main(["tasks", "--prompts", "clip_benchmark"]) == 0
    rows = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()}
    assert "clip_benchmark:fer2013" in rows["fer2013"] and "metaclip" not in rows["fer2013"]
