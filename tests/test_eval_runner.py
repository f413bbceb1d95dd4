"""`python -m eval zeroshot`: metrics per registry task, missing tasks, summaries, caching and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from sklearn.metrics import roc_auc_score

from eval.__main__ import main
from eval.classifier_cache import ClassifierCache
from eval.metrics import classification_metrics
from eval.runner import run_suite
from eval.tasks import parse_task_spec
from tests.test_eval import (
    CLASSNAMES,
    TEMPLATES,
    _direct_recall,
    _images,
    _jpeg,
    _write_wds,
    direct_classification,
    make_classification,
    make_retrieval,
)
from tests.test_eval_support import TINY_MODEL, write_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("runner")
    config_dir, ckpt = write_tiny_model(base)
    root = base / "data"
    items = {
        "cifar10": make_classification(root / "wds_cifar10"),
        "fgvc_aircraft": make_classification(root / "wds_fgvc_aircraft", seed=2),
        "kinetics700": make_classification(root / "wds_kinetics700", seed=3),
        "flickr30k": make_retrieval(root / "wds_flickr30k"),
    }
    rng = np.random.default_rng(4)  # hateful memes: 2 classes, both present
    _write_wds(root / "wds_hateful_memes", [(f"{i}", _jpeg(rng, [(200, 30, 30), (30, 30, 200)][i % 2]),
                                            ("cls", str((i // 3) % 2).encode())) for i in range(16)])  # fmt: skip
    return base, config_dir, ckpt, root, items


def _cli(setup, out: Path, tasks: str, *extra: str) -> int:
    base, config_dir, ckpt, root, _ = setup
    return main(["zeroshot", "--checkpoint", str(ckpt), "--model", TINY_MODEL, "--model-config-dir", str(config_dir),
                 "--tasks", tasks, "--dataset-root", str(root), "--out", str(out), "--num-workers", "0",
                 "--batch-size", "7", *extra])  # fmt: skip


def _model(setup):
    ckpt = setup[2]
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(ckpt))
    return model.eval(), open_clip.get_tokenizer(TINY_MODEL), preprocess


def _direct_mean_r1(clip, items) -> float:
    model, tokenizer, preprocess = clip
    texts = [c for _, caps in items for c in caps]
    text_image = torch.tensor([i for i, (_, caps) in enumerate(items) for _ in caps])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(_images(preprocess, [j for j, _ in items])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    return sum(_direct_recall(txt @ img.t(), text_image, 1)) / 2


def test_zeroshot_cli_metrics_missing_and_summary(setup, tmp_path, capsys):
    """Metrics against a direct computation with the folders' own prompts (``--prompts clip_benchmark``)."""
    _, _, _, root, items = setup
    out = tmp_path / "out"
    tasks = "cifar10,fgvc_aircraft,kinetics700,hateful_memes,cub,flickr30k,mscoco"
    cb = ("--prompts", "clip_benchmark")
    # cub and mscoco have no data: the up-front check stops before the model loads, naming both
    assert _cli(setup, out, tasks, "--p", "0.15", *cb) == 2
    err = capsys.readouterr().err
    assert f"cub: no data found; looked for {root / 'wds_cub'}" in err and "mscoco: no data found" in err
    assert not (out / "tasks").exists()
    # --keep-going opts into partial evaluation: missing tasks listed, averages say over how many
    assert _cli(setup, out, tasks, "--p", "0.15", "--keep-going", *cb) == 0
    assert "warning: cub: no data found" in capsys.readouterr().err
    res = {p.stem: json.loads(p.read_text()) for p in (out / "tasks").glob("*.json")}
    assert set(res) == set(tasks.split(","))
    clip = _model(setup)
    direct = {name: direct_classification(clip, items[name]) for name in ("cifar10", "fgvc_aircraft", "kinetics700")}
    for name, key in [("cifar10", "acc1"), ("fgvc_aircraft", "mean_per_class_recall")]:
        assert res[name]["main_metric"] == key and res[name][key] == pytest.approx(direct[name][key])
        assert res[name]["precision"] == "fp32" and res[name]["prompt_source"] == "clip_benchmark"
    k700 = direct["kinetics700"]
    assert res["kinetics700"]["top1_top5_mean"] == pytest.approx((k700["acc1"] + k700["acc5"]) / 2)
    assert res["kinetics700"]["main_metric"] == "top1_top5_mean"
    assert res["flickr30k"]["mean_recall@1"] == pytest.approx(_direct_mean_r1(clip, items["flickr30k"]))
    assert res["flickr30k"]["size_note"].startswith("the standard test split has 1000 images")  # the fixture: 12
    assert res["flickr30k"]["expected_samples"] == 1000 and res["flickr30k"]["num_samples"] == 12
    assert res["cub"] == {"task": "cub", "status": "missing", "path": str(root / "wds_cub"),
                          "looked_for": [str(root / "wds_cub")], "main_metric": "acc1",
                          "reason": f"no data found; looked for {root / 'wds_cub'}"}  # fmt: skip
    # HatefulMemes: AUC of logit[1] - logit[0] with the folder's prompt files
    assert res["hateful_memes"]["prompt_sources"]["templates"].endswith("templates.json")
    assert 0.0 <= res["hateful_memes"]["roc_auc"] <= 1.0 and res["hateful_memes"]["num_classes"] == 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["average_over"] == "5/7" and sorted(summary["missing"]) == ["cub", "mscoco"]
    assert summary["paper26"]["average_over"] == "4/26" and "cub" in summary["paper26"]["missing"]
    vals = [res[t][res[t]["main_metric"]] for t in ("cifar10", "fgvc_aircraft", "kinetics700", "hateful_memes")]
    assert summary["paper26"]["average"] == pytest.approx(sum(vals) / 4)
    ret = summary["datacomp_groups"]["Retrieval"]
    assert ret["coverage"] == "1/3" and ret["average"] == pytest.approx(res["flickr30k"]["mean_recall@1"])
    assert summary["datacomp_groups"]["IN dist. shift"]["average"] is None  # no member: null with a reason
    assert summary["datacomp_groups"]["IN dist. shift"]["average_note"] == "no member of the group was evaluated"
    # cifar10, fgvc_aircraft and kinetics700 fixtures share class names and templates: one classifier
    assert summary["classifier_cache"] == {"hits": 2, "misses": 2} and summary["precision"] == "fp32"
    assert summary["prompts"] == "clip_benchmark"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["p"] == 0.15 and metrics["label"] == "p=0.15" and set(metrics["tasks"]) == set(res)
    assert metrics["schema"] == "caption-mixing/metrics/1" and metrics["summary"]["average_over"] == "5/7"


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_hateful_auc_is_logit_difference_auc():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.2, 0.1], [0.0, 4.0], [2.0, 2.5]])
    target = torch.tensor([1, 0, 0, 1, 0])
    res = classification_metrics(logits, target, "roc_auc")
    assert res["roc_auc"] == pytest.approx(roc_auc_score(target.numpy(), (logits[:, 1] - logits[:, 0]).numpy()))
    assert res["roc_auc"] != pytest.approx(roc_auc_score(target.numpy(), logits[:, 1].numpy()))
    with pytest.raises(ValueError, match="both hateful and non-hateful"):
        classification_metrics(logits, torch.zeros(5, dtype=torch.long), "roc_auc")


def test_classifier_cache_keys_and_reuse(setup, tmp_path):
    root = setup[3]
    model, tok, pre = _model(setup)
    cache = ClassifierCache("model@sha256:x", tmp_path / "cache")
    tasks = parse_task_spec("cifar10")
    first = run_suite(model, tok, pre, tasks, root, cache=cache, batch_size=8, prompts="clip_benchmark")
    assert (cache.hits, cache.misses) == (0, 1) and len(list((tmp_path / "cache").glob("cifar10-*.pt"))) == 1
    fresh = ClassifierCache("model@sha256:x", tmp_path / "cache")  # a new process: read back from disk
    again = run_suite(model, tok, pre, tasks, root, cache=fresh, batch_size=8, prompts="clip_benchmark")
    assert (fresh.hits, fresh.misses) == (1, 0)
    assert again["tasks"]["cifar10"]["acc1"] == first["tasks"]["cifar10"]["acc1"]
    other = ClassifierCache("other-model@sha256:y", tmp_path / "cache")
    calls = []
    other.get("cifar10", ["a"], TEMPLATES, lambda: calls.append(1) or torch.zeros(4, 1))
    other.get("cifar10", ["a"], TEMPLATES[:1], lambda: calls.append(1) or torch.zeros(4, 1))
    assert len(calls) == 2, "model id and templates are part of the key"
    shared = ClassifierCache("model@sha256:x", tmp_path / "cache")  # same prompts under another task name
    shared.get("imagenetv2", CLASSNAMES, TEMPLATES, lambda: calls.append(1) or torch.zeros(4, 6), "clip_benchmark")
    assert (shared.hits, len(calls)) == (1, 2)
    # the same names and templates from another prompt source are another classifier (issue 14)
    shared.get("cifar10", CLASSNAMES, TEMPLATES, lambda: calls.append(1) or torch.zeros(4, 6), "metaclip")
    assert (shared.misses, len(calls)) == (1, 3)


def test_bad_inputs_name_what_is_wrong(setup, tmp_path, capsys):
    base, config_dir, ckpt, root, _ = setup
    # a task name that does not exist
    assert _cli(setup, tmp_path / "o1", "imagenet1k,flowerz") == 2
    assert "unknown task 'flowerz'; did you mean flowers" in capsys.readouterr().err
    # a checkpoint that does not fit the model name
    other = json.loads((config_dir / f"{TINY_MODEL}.json").read_text())
    other["embed_dim"] = 48
    cfg2 = tmp_path / "cfg2"
    cfg2.mkdir()
    (cfg2 / "EvalTest-Other.json").write_text(json.dumps(other))
    code = main(["zeroshot", "--checkpoint", str(ckpt), "--model", "EvalTest-Other", "--model-config-dir", str(cfg2),
                 "--tasks", "cifar10", "--dataset-root", str(root), "--out", str(tmp_path / "o2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"--checkpoint {ckpt} does not fit --model EvalTest-Other" in err
    # an empty shard folder
    broken = tmp_path / "broken_root"
    shutil.copytree(root / "wds_cifar10", broken / "wds_cifar10")
    for f in (broken / "wds_cifar10" / "test").iterdir():
        f.unlink()
    model, tok, pre = _model(setup)
    with pytest.raises(ValueError, match=f"shard folder {broken / 'wds_cifar10' / 'test'} is empty"):
        run_suite(model, tok, pre, parse_task_spec("cifar10"), broken, cache=ClassifierCache("m"))
    # class names whose count does not match the labels (labels reach 5, 4 names)
    (broken / "wds_cifar10").rename(broken / "gone")
    make_classification(broken / "wds_cifar10", classnames=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"wds_cifar10/classnames.txt has 4 lines but the test labels span 0..5"):
        run_suite(model, tok, pre, parse_task_spec("cifar10"), broken, cache=ClassifierCache("m"))
    # --keep-going records the error instead and the CLI exits non-zero
    res = run_suite(model, tok, pre, parse_task_spec("cifar10"), broken, cache=ClassifierCache("m"), keep_going=True)
    assert res["tasks"]["cifar10"]["status"] == "error" and "classnames.txt" in res["summary"]["errors"]["cifar10"]


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: magic, then each dimension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_builder_folders_are_read_offline(setup, tmp_path):
    """clip_benchmark's torchvision builders read ROOT/<name> without --download; unreadable ones say why."""
    model, tok, pre = _model(setup)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("t10k", 6)):
        _idx(raw / f"{split}-images-idx3-ubyte", 0x803, rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", 0x801, np.arange(n) % 10)
    (tmp_path / "cifar10").mkdir()  # present but not a torchvision CIFAR-10 folder
    res = run_suite(model, tok, pre, parse_task_spec("mnist,stl10"), tmp_path, cache=ClassifierCache("m"))
    mnist = res["tasks"]["mnist"]
    assert mnist["status"] == "ok" and mnist["path"] == str(tmp_path / "mnist") and mnist["num_samples"] == 6
    # MetaCLIP's names fit the builder's 10 classes in order; its template is used
    assert mnist["num_classes"] == 10 and mnist["prompt_source"] == "metaclip" and "prompt_note" not in mnist
    assert mnist["prompt_sources"]["templates"].endswith("metaclip_templates.json#MNIST")
    cb = run_suite(model, tok, pre, parse_task_spec("mnist"), tmp_path, prompts="clip_benchmark")["tasks"]["mnist"]
    assert cb["prompt_source"] == "clip_benchmark" and cb["prompt_sources"]["classnames"] == "dataset builder"
    assert cb["prompt_sources"]["templates"].endswith("en_zeroshot_classification_templates.json")
    assert res["tasks"]["stl10"]["looked_for"] == [str(tmp_path / "wds_stl10"), str(tmp_path / "stl10")]
    with pytest.raises(ValueError, match=r"cifar10: clip_benchmark's 'cifar10' builder could not read .* --download"):
        run_suite(model, tok, pre, parse_task_spec("cifar10"), tmp_path, cache=ClassifierCache("m"))


def test_unreadable_checkpoint_and_model_typo_are_named(setup, tmp_path, capsys):
    _, config_dir, _, root, _ = setup
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")

    def run(model: str) -> int:
        return main(["zeroshot", "--checkpoint", str(bad), "--model", model, "--model-config-dir", str(config_dir),
                     "--tasks", "cifar10", "--dataset-root", str(root), "--out", str(tmp_path / "o")])  # fmt: skip

    assert run(TINY_MODEL) == 2
    assert f"--checkpoint {bad} is not a readable open_clip checkpoint" in capsys.readouterr().err
    assert run("EvalTest-Tiyn") == 2
    assert "--model 'EvalTest-Tiyn' is not an open_clip model config; did you mean EvalTest-Tiny" in (
        capsys.readouterr().err
    )
