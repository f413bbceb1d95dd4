"""Zero-shot classification and retrieval on clip_benchmark local-WebDataset folders.

We reuse clip_benchmark (dataset loading, class-prompt classifier, logits, retrieval metrics) so the
numbers follow its conventions, but we compute top-k accuracy ourselves: clip_benchmark 1.6.2's
``metrics.zeroshot_classification.accuracy`` calls ``float()`` on a 1-element array, which raises on
numpy >= 2.4 (upstream issue #147). Nothing here knows about training: it takes a model, a tokenizer
and an eval transform.

A dataset folder looks like::

    ROOT/classnames.txt                             (classification)
    ROOT/zeroshot_classification_templates.txt      (classification, templates with {c})
    ROOT/dataset_type.txt                           (optional, "retrieval")
    ROOT/test/nshards.txt, ROOT/test/0.tar, ...     ({key}.jpg + {key}.cls or {key}.txt)
"""

from __future__ import annotations

import math
import tarfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

SPLIT = "test"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"


# ----------------------------------------------------------------------------------------------
# Dataset folder checks (clip_benchmark fails late with bare asserts or FileNotFoundError)
# ----------------------------------------------------------------------------------------------


def is_retrieval_dataset(root: str | Path) -> bool:
    """True when ``ROOT/dataset_type.txt`` says "retrieval" (clip_benchmark's own rule)."""
    type_file = Path(root) / TYPE_FILE
    return type_file.is_file() and type_file.read_text().strip().lower() == "retrieval"


def _shard_paths(root: Path, split: str = SPLIT) -> list[Path]:
    """The shards of ``split`` clip_benchmark will open, checked up front so errors name the path."""
    split_dir = root / split
    nshards_file = split_dir / "nshards.txt"
    if split_dir.is_dir() and not any(split_dir.iterdir()):
        raise ValueError(f"shard folder {split_dir} is empty: no nshards.txt and no .tar shards")
    if not nshards_file.is_file():
        raise ValueError(f"{nshards_file} is missing; a clip_benchmark wds folder needs {split}/nshards.txt")
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError as e:
        raise ValueError(f"{nshards_file} does not hold an integer shard count") from e
    if nshards < 1:
        raise ValueError(f"{nshards_file} says {nshards} shards; the {split} split {split_dir} is empty")
    shards = [split_dir / f"{i}.tar" for i in range(nshards)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"test shard folder {split_dir} lacks shard(s) {', '.join(missing)} listed by nshards.txt")
    return shards


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path} is missing; classification needs {what}")
    return [line.strip() for line in path.read_text().splitlines()]


def _count_retrieval_pairs(shards: Iterable[Path]) -> tuple[int, int]:
    """(images, captions) in retrieval shards, from tar headers and the small .txt members only."""
    n_images = n_texts = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    n_images += 1
                    data = tar.extractfile(member)
                    n_texts += len(data.read().decode("utf-8").splitlines()) if data else 0
    return n_images, n_texts


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _build_dataset(root: Path, preprocess: Any, task: str, split: str = SPLIT) -> Any:
    """clip_benchmark's local-wds loader; its unset shardshuffle warning is moot (None = no shuffle)."""
    from clip_benchmark.datasets.builder import build_dataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
        return build_dataset(f"wds/{root.name}", root=str(root), transform=preprocess, split=split, task=task)


def _autocast_device(device: str) -> str:
    """clip_benchmark passes ``device`` to ``torch.autocast``, which accepts only a device type."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev.index)
    return dev.type


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Iterable[int] = (1,)) -> list[float]:
    """Share of samples whose label is among the k largest logits (clip_benchmark's rule, numpy-free)."""
    ks = list(topk)
    pred = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, :k].any(dim=1).float().mean().item() for k in ks]


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def _check_labels(target: torch.Tensor, num_classes: int, classnames_file: Path) -> None:
    """Labels outside the classnames range mean the wrong classnames file; say which one."""
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{classnames_file} has {num_classes} lines but the test labels span {lo}..{hi}; "
            f"classnames.txt must have one line per label id"
        )


def evaluate_classification(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    root: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy and mean per-class recall, all as fractions in [0, 1]."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score

    root = Path(root)
    num_workers = min(num_workers, len(_shard_paths(root)))  # webdataset gives each worker whole shards
    classnames_file = root / CLASSNAMES_FILE
    _read_lines(classnames_file, "one class name per label id")
    templates = [t for t in _read_lines(root / TEMPLATES_FILE, "prompt templates with {c}") if t]
    if not templates:
        raise ValueError(f"{root / TEMPLATES_FILE} holds no templates")

    ds = _build_dataset(root, preprocess, "zeroshot_classification")
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    dev = _autocast_device(device)
    classifier = zero_shot_classifier(model, tokenizer, ds.classes, templates, dev, amp=amp)
    try:
        logits, target = run_classification(model, classifier, loader, dev, amp=amp)
    except (RuntimeError, ValueError) as e:  # webdataset's empty check, or torch.cat of no batches
        if "non-empty" in str(e) or "No samples found" in str(e):
            raise ValueError(f"no samples in the test shards under {root / SPLIT}") from e
        raise
    num_classes = len(ds.classes)
    _check_labels(target, num_classes, classnames_file)

    # clip_benchmark reports acc5 only with >= 5 classes (top-5 of fewer is trivially 1)
    acc1, acc5 = (
        topk_accuracy(logits, target, (1, 5)) if num_classes >= 5 else (*topk_accuracy(logits, target), math.nan)
    )
    recall = balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())
    return {
        "task_type": "classification",
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": float(recall),
        "num_samples": len(target),
        "num_classes": num_classes,
        "main_metric": "acc1",
    }


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    root: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    recall_k: Iterable[int] = (1, 5, 10),
    split: str = SPLIT,
) -> dict[str, Any]:
    """Image/text recall@k with clip_benchmark's ``zeroshot_retrieval.evaluate`` (fine on numpy 2.4).

    "image_retrieval" ranks images for each caption, "text_retrieval" captions for each image (a hit
    when any of its captions is in the top k). clip_benchmark's topk fails when k exceeds the number
    of images or captions, so sets that small (smoke tests, tiny testbeds) go through
    :func:`_small_set_recalls`, which mirrors ``evaluate`` with k clamped per direction.
    """
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    root = Path(root)
    shards = _shard_paths(root, split)
    num_workers = min(num_workers, len(shards))  # webdataset gives each worker whole shards
    n_images, n_texts = _count_retrieval_pairs(shards)
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"no image-caption pairs in {root / split}")
    ks = sorted({1, *(int(k) for k in recall_k)})  # R@1 always: it feeds the main metric
    if ks[0] < 1:
        raise ValueError(f"recall_k must be positive integers, got {tuple(recall_k)}")

    ds = _build_dataset(root, preprocess, "zeroshot_retrieval", split)
    dev = _autocast_device(device)
    collate, pin = image_captions_collate_fn, dev == "cuda"
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin)
    if ks[-1] <= min(n_images, n_texts):
        metrics = evaluate(model, loader, tokenizer, dev, amp=amp, recall_k_list=ks)
    else:
        metrics = _small_set_recalls(model, loader, tokenizer, dev, amp, ks)
    mean_r1 = (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"]) / 2
    return {
        "task_type": "retrieval",
        **metrics,
        "mean_recall@1": mean_r1,
        "num_samples": n_images,
        "num_texts": n_texts,
        "main_metric": "mean_recall@1",
    }


def _small_set_recalls(
    model: torch.nn.Module, loader: DataLoader, tokenizer: Any, device: str, amp: bool, ks: list[int]
) -> dict[str, float]:
    """clip_benchmark's retrieval ``evaluate`` step for step, with k clamped to each direction's size.

    Recall@k for k >= the number of candidates equals recall at that number (all are retrieved).
    """
    import torch.nn.functional as F
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, dataloader_with_indices, recall_at_k

    images_emb, texts_emb, texts_image_index = [], [], []
    for batch_images, batch_texts, inds in dataloader_with_indices(loader):
        tokens = tokenizer([text for texts in batch_texts for text in texts]).to(device)
        texts_image_index.extend(int(i) for i, texts in zip(inds, batch_texts, strict=True) for _ in texts)
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            images_emb.append(F.normalize(model.encode_image(batch_images.to(device)), dim=-1).cpu())
            texts_emb.append(F.normalize(model.encode_text(tokens), dim=-1).cpu())
    chunk = len(images_emb[0])
    scores = torch.cat(texts_emb) @ torch.cat(images_emb).t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), texts_image_index] = True
    metrics = {}
    for k in ks:
        k_img, k_txt = min(k, scores.shape[1]), min(k, scores.shape[0])
        image_r = batchify(recall_at_k, scores, positive, chunk, device, k=k_img) > 0
        text_r = batchify(recall_at_k, scores.T, positive.T, chunk, device, k=k_txt) > 0
        metrics[f"image_retrieval_recall@{k}"] = image_r.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_r.float().mean().item()
    return metrics


# ----------------------------------------------------------------------------------------------
# Several tasks
# ----------------------------------------------------------------------------------------------


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    tasks: Mapping[str, str | Path],
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate every task; a missing folder is reported as missing, never silently dropped."""
    if amp is None:
        amp = str(device).startswith("cuda")
    was_training = model.training
    model.eval()
    kw = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "amp": amp}
    results: dict[str, dict] = {}
    try:
        with torch.no_grad():
            for name, path in tasks.items():
                results[name] = _evaluate_one(model, tokenizer, preprocess, Path(path), name, progress, **kw)
    finally:
        model.train(was_training)
    return results


def _evaluate_one(
    model: torch.nn.Module, tokenizer: Any, preprocess: Any, path: Path, name: str, progress: bool, **kw: Any
) -> dict[str, Any]:
    """One task: classification or retrieval by ``dataset_type.txt``, with status and wall time."""
    if not path.is_dir():
        if progress:
            print(f"[eval] {name}: MISSING ({path})", flush=True)
        return {"status": "missing", "path": str(path)}
    t0 = time.perf_counter()
    fn = evaluate_retrieval if is_retrieval_dataset(path) else evaluate_classification
    result = {**fn(model, tokenizer, preprocess, path, **kw), "status": "ok"}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if progress:
        key = result["main_metric"]
        print(f"[eval] {name}: {key}={result[key]:.4f} ({result['num_samples']} samples)", flush=True)
    return result


def main_metric_value(result: Mapping[str, Any]) -> float | None:
    """The task's main metric, or None when the task is missing or failed."""
    if result.get("status", "ok") != "ok" or not result.get("main_metric"):
        return None
    value = result.get(result["main_metric"])
    return float(value) if value is not None else None


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean of main metrics over the tasks that ran; missing tasks are listed, not hidden."""
    values = [v for v in (main_metric_value(r) for r in results.values()) if v is not None]
    return {
        "average": sum(values) / len(values) if values else math.nan,
        "num_tasks_averaged": len(values),
        "num_tasks": len(results),
        "missing": [name for name, r in results.items() if r.get("status") == "missing"],
    }
