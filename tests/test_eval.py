"""The one evaluation path (``eval.runner.run_suite``) against direct computations on a tiny random CLIP."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.locate import locate
from eval.report import format_table, load_run, write_sweep_report
from eval.results import summarize
from eval.runner import run_suite
from eval.tasks import parse_task_spec
from eval.wds_folder import is_retrieval_dataset
from eval.zeroshot import evaluate_retrieval

CLASSNAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (30, 220, 220), (220, 30, 220)]
PER_CLASS = [2, 3, 4, 5, 7, 9]  # 30 images, imbalanced so balanced accuracy differs from acc1
TEMPLATES = ["a photo of a {c} thing.", "{c}", "a {c} square."]
WORDS = ["red", "green", "blue", "square", "dog", "cat", "tree", "car", "small", "big", "sky", "sea"]


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny model and wds folders in clip_benchmark's local layout
# ----------------------------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator, color: tuple[int, int, int]) -> bytes:
    """A noisy image around ``color``, so every sample gets its own embedding."""
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _write_wds(root: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    """samples: (key, jpg bytes, label-or-captions bytes) -> ROOT/test/0.tar + nshards.txt."""
    test = root / "test"
    test.mkdir(parents=True)
    with tarfile.open(test / "0.tar", "w") as tar:
        for key, jpg, (ext, payload) in ((k, j, p) for k, j, p in samples):
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.{ext}", payload)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (test / "nshards.txt").write_text("1\n")


def make_classification(root: Path, classnames: list[str] = CLASSNAMES, seed: int = 0) -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(seed)
    items = [(_jpeg(rng, COLORS[c]), c) for c, n in enumerate(PER_CLASS) for _ in range(n)]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    _write_wds(root, [(f"{i:04d}", jpg, ("cls", str(y).encode())) for i, (jpg, y) in enumerate(items)])
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return items


def make_retrieval(root: Path, n: int = 12, seed: int = 1) -> list[tuple[bytes, list[str]]]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        caps = [" ".join(rng.choice(WORDS, size=4)) for _ in range(2)]
        items.append((_jpeg(rng, COLORS[i % len(COLORS)]), caps))
    _write_wds(root, [(f"{i:04d}", jpg, ("txt", "\n".join(caps).encode())) for i, (jpg, caps) in enumerate(items)])
    (root / "dataset_type.txt").write_text("retrieval\n")
    return items


@pytest.fixture(scope="module")
def clip():
    """(model, tokenizer, preprocess): a random-init tiny CLIP, 32 px, context length 16."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    with torch.no_grad():  # a stronger patch embedding, so random-init predictions depend on the image
        model.visual.conv1.weight.normal_(0, 0.1)
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, tokenizer, preprocess


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_data")
    cls_items = make_classification(base / "colors")
    ret_items = make_retrieval(base / "pairs")
    return base, cls_items, ret_items


def _images(preprocess, jpgs: list[bytes]) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpgs])


def direct_classification(clip, items: list[tuple[bytes, int]], classnames: list[str] = CLASSNAMES) -> dict:
    """acc1, acc5 and mean per-class recall computed from first principles (no eval code)."""
    model, tokenizer, preprocess = clip
    with torch.no_grad():
        img = F.normalize(model.encode_image(_images(preprocess, [j for j, _ in items])), dim=-1)
        weights = []
        for name in classnames:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in TEMPLATES])), dim=-1).mean(0)
            weights.append(emb / emb.norm())
        logits = img @ torch.stack(weights, dim=1)
    y = torch.tensor([c for _, c in items])
    pred = logits.argmax(1)
    assert pred.unique().numel() > 1, "fixture too degenerate: every image gets the same class"
    return {
        "acc1": (pred == y).float().mean().item(),
        "acc5": (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item(),
        "mean_per_class_recall": np.mean([(pred[y == c] == c).float().mean().item() for c in y.unique().tolist()]),
    }


def evaluate(clip, spec: str, dataset_root: Path | None = None, **kw) -> dict:
    """Per-task results of ``run_suite`` for a task spec (the one evaluation path)."""
    model, tokenizer, preprocess = clip
    return run_suite(model, tokenizer, preprocess, parse_task_spec(spec), dataset_root, progress=False, **kw)["tasks"]


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def test_classification_matches_direct_computation(clip, datasets):
    base, items, _ = datasets
    direct = direct_classification(clip, items)
    res = evaluate(clip, f"colors={base / 'colors'}", batch_size=7)["colors"]
    assert res["task_type"] == "classification" and res["main_metric"] == "acc1" and res["status"] == "ok"
    assert res["num_samples"] == 30 and res["num_classes"] == 6 and res["precision"] == "fp32"
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert res[key] == pytest.approx(direct[key]), key
        assert 0.0 <= res[key] <= 1.0


def test_acc5_is_not_reported_below_five_classes(clip, tmp_path):
    root = tmp_path / "few"
    rng = np.random.default_rng(3)
    _write_wds(root, [(f"{i}", _jpeg(rng, COLORS[i % 3]), ("cls", str(i % 3).encode())) for i in range(6)])
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("{c}\n")
    res = evaluate(clip, f"few={root}")["few"]
    assert res["acc5"] is None and "3 classes" in res["acc5_note"] and res["num_classes"] == 3


def test_classnames_label_mismatch_names_the_file(clip, tmp_path):
    make_classification(tmp_path / "bad", classnames=CLASSNAMES[:4])  # labels go up to 5
    with pytest.raises(ValueError, match="bad: .*classnames.txt"):
        evaluate(clip, f"bad={tmp_path / 'bad'}")


def test_missing_nshards_and_empty_split_name_the_path(clip, tmp_path):
    root = tmp_path / "broken"
    make_classification(root)
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(ValueError, match="nshards.txt"):
        evaluate(clip, f"broken={root}")
    (root / "test" / "0.tar").unlink()
    (root / "test" / "nshards.txt").write_text("0\n")
    with pytest.raises(ValueError, match=str(root / "test")):
        evaluate(clip, f"broken={root}")


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def _direct_recall(scores: torch.Tensor, text_image: torch.Tensor, k: int) -> tuple[float, float]:
    """(image retrieval R@k, text retrieval R@k) from the texts x images similarity matrix."""
    k_img = min(k, scores.shape[1])
    image_hits = (scores.topk(k_img, dim=1).indices == text_image[:, None]).any(1).float().mean().item()
    k_txt = min(k, scores.shape[0])
    top_texts = scores.t().topk(k_txt, dim=1).indices  # images x k
    text_hits = (text_image[top_texts] == torch.arange(scores.shape[1])[:, None]).any(1).float().mean().item()
    return image_hits, text_hits


def test_retrieval_matches_direct_computation(clip, datasets):
    model, tokenizer, preprocess = clip
    base, _, items = datasets
    assert is_retrieval_dataset(base / "pairs") and not is_retrieval_dataset(base / "colors")
    texts = [c for _, caps in items for c in caps]
    text_image = torch.tensor([i for i, (_, caps) in enumerate(items) for _ in caps])
    with torch.no_grad():
        img = F.normalize(model.encode_image(_images(preprocess, [j for j, _ in items])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    scores = txt @ img.t()

    # (1, 5, 10) fits 12 images / 24 captions: clip_benchmark's evaluate; 50 does not: the clamped mirror
    (task,) = parse_task_spec(f"pairs={base / 'pairs'}")
    assert task.kind == "retrieval" and task.metric == "mean_recall@1"
    src = locate(task, None)
    for recall_k in ((1, 5, 10), (1, 5, 10, 50)):
        res = evaluate_retrieval(task, src, model, tokenizer, preprocess, batch_size=5, recall_k=recall_k)
        assert res["task_type"] == "retrieval" and res["main_metric"] == "mean_recall@1"
        assert res["num_samples"] == 12 and res["num_texts"] == 24
        for k in recall_k:
            image_r, text_r = _direct_recall(scores, text_image, k)
            assert res[f"image_retrieval_recall@{k}"] == pytest.approx(image_r), (recall_k, k)
            assert res[f"text_retrieval_recall@{k}"] == pytest.approx(text_r), (recall_k, k)
        mean_r1 = (res["text_retrieval_recall@1"] + res["image_retrieval_recall@1"]) / 2
        assert res["mean_recall@1"] == pytest.approx(mean_r1)
    assert res["image_retrieval_recall@50"] == 1.0 and res["text_retrieval_recall@50"] == 1.0
    suite = evaluate(clip, f"pairs={base / 'pairs'}", batch_size=5)["pairs"]  # the suite: same numbers
    assert {k: suite[k] for k in ("mean_recall@1", "text_retrieval_recall@5")} == pytest.approx(
        {k: res[k] for k in ("mean_recall@1", "text_retrieval_recall@5")}
    )


# ----------------------------------------------------------------------------------------------
# Several tasks
# ----------------------------------------------------------------------------------------------


def test_run_suite_reports_missing_and_summarizes(clip, datasets, capsys):
    model, _, _ = clip
    base, _, _ = datasets
    gone = base / "does_not_exist"
    model.train()
    results = evaluate(clip, f"colors={base / 'colors'},pairs={base / 'pairs'},gone={gone}")
    assert model.training, "run_suite must restore the caller's train/eval mode"
    assert results["gone"] == {"status": "missing", "path": str(gone), "looked_for": [str(gone)],
                               "main_metric": "acc1", "reason": f"no data found; looked for {gone}"}  # fmt: skip
    assert results["colors"]["status"] == "ok" and results["colors"]["task_type"] == "classification"
    assert results["pairs"]["status"] == "ok" and results["pairs"]["task_type"] == "retrieval"
    assert all(results[t]["seconds"] >= 0 for t in ("colors", "pairs"))
    assert capsys.readouterr().err == "", "progress=False prints no bars"

    summary = summarize(results)
    assert summary["num_tasks"] == 3 and summary["num_tasks_averaged"] == 2 and summary["average_over"] == "2/3"
    assert summary["missing"] == ["gone"]
    expected = (results["colors"]["acc1"] + results["pairs"]["mean_recall@1"]) / 2
    assert summary["average"] == pytest.approx(expected)
    json.dumps(results, allow_nan=False)  # metrics.json must be able to hold them


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _cls(acc1: float) -> dict:
    return {"task_type": "classification", "acc1": acc1, "acc5": 0.9, "mean_per_class_recall": acc1,
            "main_metric": "acc1", "status": "ok", "num_samples": 10, "num_classes": 6}  # fmt: skip


def _ret(r1: float) -> dict:
    res = {"task_type": "retrieval", "main_metric": "mean_recall@1", "status": "ok", "num_samples": 12}
    for k in (1, 5, 10):
        res[f"image_retrieval_recall@{k}"] = min(1.0, r1 * k)
        res[f"text_retrieval_recall@{k}"] = min(1.0, (r1 + 0.02) * k)
    res["mean_recall@1"] = r1 + 0.01
    return res


def _write_runs(base: Path) -> list[Path]:
    specs = [
        (1.0, {"concept": _cls(0.20), "count": _cls(0.50), "retrieval": _ret(0.30)}),
        (0.0, {"concept": _cls(0.40), "count": _cls(0.30), "retrieval": _ret(0.25)}),
        (0.15, {"concept": _cls(0.4567), "count": {"status": "missing", "path": "/x/count"}, "retrieval": _ret(0.35)}),
    ]
    dirs = []
    for p, tasks in specs:
        d = base / f"run-p{p:g}"
        d.mkdir(parents=True)
        doc = {"p": p, "label": f"p={p:g}", "tasks": tasks, "summary": summarize(tasks), "steps": 5}
        (d / "metrics.json").write_text(json.dumps(doc))
        dirs.append(d)
    return dirs


def test_write_sweep_report(tmp_path):
    runs = [load_run(d) for d in _write_runs(tmp_path / "runs")]
    assert runs[0]["p"] == 1.0 and runs[0]["label"] == "p=1" and runs[0]["run_dir"].endswith("run-p1")
    paths = write_sweep_report(runs, tmp_path / "report", title="Sweep test", notice="Testbed numbers only.")
    assert set(paths) == {"markdown", "csv", "png"}
    assert all(p.is_file() for p in paths.values())

    md = paths["markdown"].read_text()
    assert "# Sweep test" in md and "Testbed numbers only." in md
    assert "concept (acc1)" in md and "retrieval (mean_recall@1)" in md and "average" in md
    rows = [line for line in md.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "0.15", "1"]
    row_015 = [c.strip() for c in rows[1].strip("|").split("|")]
    assert row_015[1:4] == ["45.7", "—", "36.0"]  # concept, count (missing), retrieval mean R@1
    assert row_015[4].startswith(f"{100 * (0.4567 + 0.36) / 2:.1f}") and "2/3" in row_015[4]
    row_0 = [c.strip() for c in rows[0].strip("|").split("|")]
    assert row_0[1:] == ["40.0", "30.0", "26.0", f"{100 * (0.40 + 0.30 + 0.26) / 3:.1f}"]
    assert format_table(runs) in md

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["p"]) for r in table] == [0.0, 0.15, 1.0]
    assert float(table[1]["concept acc1 (%)"]) == pytest.approx(45.67)
    assert table[1]["count acc1 (%)"] == ""
    assert float(table[2]["retrieval text_retrieval_recall@5 (%)"]) == pytest.approx(100.0)
    assert float(table[0]["retrieval image_retrieval_recall@1 (%)"]) == pytest.approx(25.0)
    assert table[1]["missing"] == "count" and table[1]["num_tasks_averaged"] == "2"

    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "report").glob(".*.tmp")), "atomic writes leave no temp files"
