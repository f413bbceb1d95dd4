"""MetaCLIP's clipeval prompts as the default (issue 14, item 1): vendored lists, several names per class,
label order from the data, the clip_benchmark alternative, and all 26 metrics on fixed logits."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.classifier_cache import ClassifierCache
from eval.metrics import classification_metrics
from eval.prompts import (
    CLIP_BENCHMARK,
    METACLIP,
    METACLIP_LABELS,
    METACLIP_TEMPLATES,
    Prompts,
    align_classes,
    metaclip_lists,
    packaged_classnames,
    packaged_templates,
    task_prompts,
)
from eval.runner import run_suite
from eval.tasks import PAPER_TASKS, REGISTRY, parse_task_spec
from eval.zeroshot import zero_shot_classifier
from tests.test_eval import clip  # noqa: F401  (the tiny random CLIP fixture)

FER = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
CLEVR_CB = ["three", "four", "five", "six", "seven", "eight", "nine", "ten"]  # clip_benchmark's label order


def _raw(path: Path, key: str) -> dict:
    """A vendored MetaCLIP file read independently of eval.prompts."""
    doc = json.loads(path.read_text())
    return doc[key]


def write_class_folder(root: Path, classnames: list[str], per_class: int = 3, seed: int = 0) -> list[int]:
    """A clip_benchmark wds folder: noisy images with a colour per class, ``classnames.txt``, one template."""
    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True)
    labels = [c for c in range(len(classnames)) for _ in range(per_class)]
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, y in enumerate(labels):
            base = np.array([(37 * y) % 256, (91 * y + 50) % 256, (151 * y + 100) % 256])
            arr = np.clip(base[None, None, :] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            for name, data in ((f"{i:04d}.jpg", buf.getvalue()), (f"{i:04d}.cls", str(y).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a picture of {c} things\n")
    return labels


def direct_weights(model, tokenizer, classes: list[list[str]], templates: list[str]) -> torch.Tensor:
    """clipeval's build_text_features from first principles: mean of normalised texts, renormalised."""
    cols = []
    with torch.no_grad():
        for names in classes:
            texts = [t.format(n) if "{}" in t else t.format(c=n) for t in templates for n in names]
            emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
            cols.append(emb / emb.norm())
    return torch.stack(cols, dim=1)


def test_vendored_files_name_their_source_and_cover_the_26_tasks():
    for path, key in ((METACLIP_LABELS, "labels"), (METACLIP_TEMPLATES, "templates")):
        doc = json.loads(path.read_text())
        src = doc["source"]
        assert src["repository"] == "facebookresearch/MetaCLIP" and src["path"] == f"clipeval/slip/{path.name[9:]}"
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and src["commit"] in src["url"]
        assert {t.metaclip_key for t in PAPER_TASKS} <= set(doc[key]), path
    labels = _raw(METACLIP_LABELS, "labels")
    assert labels["FacialEmotionRecognition2013"][3] == ["happy", "smiling"]
    assert labels["CLEVRCounts"] == ["10", "3", "4", "5", "6", "7", "8", "9"]  # MetaCLIP's own folder order


def test_metaclip_prompts_where_they_differ_from_clip_benchmark(tmp_path):
    """The five differences the issue lists, read through task_prompts for folders as clip_benchmark ships them."""
    folder = tmp_path / "none"  # no classnames.txt: the label order is clip_benchmark's list for the task
    folder.mkdir()
    clevr = task_prompts(REGISTRY["clevr"], folder)
    assert clevr.source == METACLIP and clevr.templates == ("a photo of {c} objects.",)
    assert clevr.classnames == ["3", "4", "5", "6", "7", "8", "9", "10"]  # label 0 = three objects
    assert "label order" in clevr.note
    old = task_prompts(REGISTRY["clevr"], folder, CLIP_BENCHMARK)
    assert old.classnames == CLEVR_CB and old.templates == ("a picture of {c} objects",) and old.note == ""
    assert len(task_prompts(REGISTRY["resisc45"], folder).templates) == 18
    assert len(packaged_templates("resisc45")[0]) == 4  # what clip_benchmark's source uses
    assert task_prompts(REGISTRY["pcam"], folder).templates == ("this is a photo of {c}",)
    fer = task_prompts(REGISTRY["fer2013"], folder)
    assert fer.classes[3] == ("happy", "smiling") and fer.record()["num_names"] == 12
    assert fer.class_texts(3)[:2] == ["a photo of a happy looking face.", "a photo of a smiling looking face."]
    (folder / "classnames.txt").write_text("\n".join(packaged_classnames("ucf101")[0]))  # classInd order
    assert "Hand Stand Pushups" in task_prompts(REGISTRY["ucf101"], folder).classnames
    assert "Handstand Pushups" in task_prompts(REGISTRY["ucf101"], folder, CLIP_BENCHMARK).classnames


def test_label_order_comes_from_the_data():
    vendored = (("10",), ("3",), ("4",))
    assert align_classes(["3", "4", "10"], vendored, "f")[0] == (("3",), ("4",), ("10",))
    assert align_classes(["three", "four", "ten"], vendored, "f")[0] == (("3",), ("4",), ("10",))
    same, note = align_classes(["Ten", "three", "4"], vendored, "f")
    assert same == vendored and note == ""
    classes, note = align_classes(["3", "4"], vendored, "f")  # a class count that differs
    assert classes is None and "MetaCLIP's list has 3 classes, f has 2" in note
    kept, note = align_classes(["10", "drei", "4"], vendored, "f")  # one spelled differently, the rest in place
    assert kept == vendored and "1 of 3 names" in note
    kept, note = align_classes(["a", "b", "c"], vendored, "f")  # nothing to compare: the count decides
    assert kept == vendored and "cannot be compared" in note
    classes, note = align_classes(["4", "10", "zehn"], vendored, "f")  # reordered and one without counterpart
    assert classes is None and "'zehn'" in note
    fer = (("happy", "smiling"), ("sad", "depressed"))
    assert align_classes(["Sad", "smiling"], fer, "f")[0] == (("sad", "depressed"), ("happy", "smiling"))


def test_multi_name_classes_averaged_as_clipeval_and_recorded(clip, tmp_path):  # noqa: F811
    model, tokenizer, preprocess = clip
    root = tmp_path / "root"
    labels = write_class_folder(root / "wds_fer2013", FER, per_class=4)
    prompts = task_prompts(REGISTRY["fer2013"], root / "wds_fer2013")
    names = _raw(METACLIP_LABELS, "labels")["FacialEmotionRecognition2013"]
    raw_templates = _raw(METACLIP_TEMPLATES, "templates")["FacialEmotionRecognition2013"]
    expected = direct_weights(model, tokenizer, names, raw_templates)
    ours = zero_shot_classifier(model, tokenizer, prompts, "cpu", amp=False, chunk=5)  # chunks cut across classes
    assert torch.allclose(ours, expected, atol=1e-5)
    first_names = direct_weights(model, tokenizer, [n[:1] for n in names], raw_templates)
    assert not torch.allclose(ours[:, 3], first_names[:, 3], atol=1e-3), "the synonyms must change the class"

    res = run_suite(model, tokenizer, preprocess, parse_task_spec("fer2013"), root, progress=False)["tasks"]["fer2013"]
    assert res["prompt_source"] == "metaclip" and res["num_names"] == 12 and res["num_templates"] == 6
    assert res["prompt_sources"]["classnames"].endswith("metaclip_labels.json#FacialEmotionRecognition2013")
    with torch.no_grad():
        imgs = [Image.open(io.BytesIO(m)) for m in _jpegs(root / "wds_fer2013")]
        feats = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in imgs])), dim=-1)
    pred = (feats @ expected).argmax(1)
    assert res["acc1"] == pytest.approx((pred == torch.tensor(labels)).float().mean().item())


def _jpegs(folder: Path) -> list[bytes]:
    with tarfile.open(folder / "test" / "0.tar") as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]


def test_clevr_scored_in_the_datas_label_order_and_both_sources_recorded(clip, tmp_path):  # noqa: F811
    model, tokenizer, preprocess = clip
    root = tmp_path / "root"
    labels = torch.tensor(write_class_folder(root / "wds_vtab-clevr_count_all", CLEVR_CB, per_class=3, seed=1))
    with torch.no_grad():
        imgs = [Image.open(io.BytesIO(m)) for m in _jpegs(root / "wds_vtab-clevr_count_all")]
        feats = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in imgs])), dim=-1)
    digits = [[str(n)] for n in range(3, 11)]  # label 0 is "3": MetaCLIP's "10" first must not leak through
    acc = {
        "metaclip": (
            (feats @ direct_weights(model, tokenizer, digits, ["a photo of {} objects."])).argmax(1) == labels
        ),
        "clip_benchmark": (
            (feats @ direct_weights(model, tokenizer, [[c] for c in CLEVR_CB], ["a picture of {c} things"])).argmax(1)
            == labels
        ),
    }
    cache = ClassifierCache("tiny")
    for source in ("metaclip", "clip_benchmark"):
        suite = run_suite(model, tokenizer, preprocess, parse_task_spec("clevr"), root, cache=cache, prompts=source,
                          progress=False)  # fmt: skip
        res = suite["tasks"]["clevr"]
        assert res["prompt_source"] == source and suite["summary"]["prompts"] == source
        assert res["acc1"] == pytest.approx(acc[source].float().mean().item()), source
    assert cache.misses == 2, "the prompt source is part of the classifier key"
    with pytest.raises(ValueError, match="prompts: 'openai' is not a prompt source"):
        run_suite(model, tokenizer, preprocess, parse_task_spec("clevr"), root, prompts="openai")


def test_adhoc_folders_use_their_own_files(clip, tmp_path):  # noqa: F811
    model, tokenizer, preprocess = clip
    write_class_folder(tmp_path / "mine", CLEVR_CB)
    for spec in (f"clevr={tmp_path / 'mine'}", f"counts={tmp_path / 'mine'}"):
        (task,) = parse_task_spec(spec)
        res = run_suite(model, tokenizer, preprocess, [task], None, progress=False)["tasks"][task.name]
        assert res["prompt_source"] == "folder" and res["num_templates"] == 1
        assert res["prompt_sources"]["templates"] == str(tmp_path / "mine" / "zeroshot_classification_templates.txt")


class FakeTextTower(torch.nn.Module):
    """encode_text: a fixed random vector per distinct text (its id comes from :meth:`tokenize`)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim, self.ids, self.texts, self.cache = dim, {}, [], {}

    def vector(self, text: str) -> np.ndarray:
        if text not in self.cache:
            self.cache[text] = np.random.default_rng(zlib.crc32(text.encode())).normal(size=self.dim)
        return self.cache[text]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        for t in texts:
            if t not in self.ids:
                self.ids[t] = len(self.texts)
                self.texts.append(t)
        return torch.tensor([self.ids[t] for t in texts])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor(np.stack([self.vector(self.texts[i]) for i in ids.tolist()]), dtype=torch.float32)


def _independent_metric(metric: str, logits: np.ndarray, y: np.ndarray) -> float:
    """MetaCLIP clipeval's definitions written out in numpy."""
    pred = logits.argmax(1)
    if metric == "acc1":
        return float((pred == y).mean())
    if metric == "mean_per_class_recall":
        return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
    if metric == "top1_top5_mean":
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return float(((pred == y).mean() + (top5 == y[:, None]).any(1).mean()) / 2)
    if metric == "roc_auc":  # Mann-Whitney: share of (hateful, not hateful) pairs ranked right, ties half
        score = logits[:, 1] - logits[:, 0]
        pos, neg = score[y == 1], score[y == 0]
        return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())
    raise AssertionError(metric)


def test_all_26_metrics_on_fixed_logits_against_independent_formulas():
    """Per task: MetaCLIP's classes (several names where it has them) x templates through a fixed text tower,
    image features near their class, then the registry metric against clipeval's definition."""
    tower = FakeTextTower()
    labels, templates = _raw(METACLIP_LABELS, "labels"), _raw(METACLIP_TEMPLATES, "templates")
    seen_multi = False
    for i, task in enumerate(PAPER_TASKS):
        names = [c if isinstance(c, list) else [c] for c in labels[task.metaclip_key]]
        seen_multi |= any(len(n) > 1 for n in names)
        w = []  # independent: clipeval's build_text_features in float64
        for ns in names:
            v = np.stack([tower.vector(t.format(n)) for t in templates[task.metaclip_key] for n in ns])
            m = (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(0)
            w.append(m / np.linalg.norm(m))
        w = np.stack(w, axis=1)
        classes, tmpl = metaclip_lists(task.metaclip_key)
        ours = zero_shot_classifier(tower, tower.tokenize, Prompts(classes, tmpl, METACLIP), "cpu", amp=False)
        assert np.allclose(ours.numpy(), w, atol=1e-5), task.name

        rng = np.random.default_rng(i)
        n_classes = w.shape[1]
        y = rng.permutation(np.repeat(np.arange(n_classes), 2 if n_classes > 10 else 12))
        img = w.T[y] + rng.normal(0, 0.35 if n_classes > 10 else 1.0, (len(y), w.shape[0]))
        logits = (100 * (img / np.linalg.norm(img, axis=1, keepdims=True)) @ w).astype(np.float32)
        res = classification_metrics(torch.from_numpy(logits), torch.from_numpy(y), task.metric)
        want = _independent_metric(task.metric, logits, y)
        assert res[task.metric] == pytest.approx(want, abs=1e-6), task.name
        assert res["main_metric"] == task.metric and 0.0 < want < 1.0, task.name
    assert seen_multi, "FER-2013's synonyms must be part of the check"
