"""Score one located task on a loaded model: zero-shot classification or image-text retrieval.

We reuse clip_benchmark's dataset readers and retrieval ``evaluate`` so the numbers follow its
conventions. The class-prompt classifier is ours (:func:`zero_shot_classifier`), since MetaCLIP's prompts
give some classes several names, averaged as its clipeval does; with one name per class it is
clip_benchmark's classifier. The classification loop is ours too (:func:`image_logits`: a progress bar
and logits in fp32 whatever the autocast) and top-k comes from ``eval.metrics`` (clip_benchmark 1.6.2's
crashes on numpy >= 2.4). WinoGAViL is scored in ``eval.association``. ``eval.runner.run_suite`` is the
only caller that matters: it locates each task's data (``eval.locate``) and hands it here. Nothing here
knows about training.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from eval.classifier_cache import ClassifierCache
from eval.locate import DataSource
from eval.metrics import classification_metrics
from eval.prompts import METACLIP, Prompts, task_prompts
from eval.tasks import Task
from eval.wds_folder import check_labels, count_retrieval_pairs, is_retrieval_dataset, shard_paths


def autocast_device(device: str) -> str:
    """The device type ``torch.autocast`` (and clip_benchmark, which passes it there) accepts."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev.index)
    return dev.type


@contextlib.contextmanager
def _shardshuffle_unset_ok() -> Iterator[None]:
    """webdataset warns that shardshuffle is unset; None (no shuffle) is what evaluation wants."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
        yield


@contextlib.contextmanager
def _cb_progress(enabled: bool) -> Iterator[None]:
    """clip_benchmark's classifier and retrieval loops draw tqdm bars; silence them when progress is off."""
    if enabled:
        yield
        return
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    modules = (zeroshot_classification, zeroshot_retrieval)
    saved = [m.tqdm for m in modules]
    for m in modules:
        m.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for m, bar in zip(modules, saved, strict=True):
            m.tqdm = bar


def build_dataset(task: Task, src: DataSource, preprocess: Any, download: bool = False) -> Any:
    """clip_benchmark's dataset for ``src``: its local-wds reader, or its torchvision builder (offline)."""
    from clip_benchmark.datasets.builder import build_dataset as cb_build
    from clip_benchmark.datasets.builder import build_wds_dataset

    with _shardshuffle_unset_ok():
        if src.kind == "wds":
            shard_paths(src.path, src.split)
            # build_wds_dataset, not build_dataset: the latter asserts on a missing classnames.txt, while we fall
            # back to the packaged lists (eval.prompts) and record which source was used
            with contextlib.redirect_stdout(io.StringIO()):  # its "classnames.txt not found" notices
                return build_wds_dataset(f"wds/{src.path.name}", preprocess, split=src.split, data_dir=str(src.path))
        try:
            return cb_build(
                task.cb_name,
                root=str(src.path),
                transform=preprocess,
                split=src.split,
                download=download,
                task="zeroshot_classification",
            )
        except (RuntimeError, FileNotFoundError, OSError, AssertionError) as e:
            raise ValueError(
                f"{task.name}: clip_benchmark's {task.cb_name!r} builder could not read {src.path} "
                f"offline ({e}); pass --download to fetch it, or provide {task.wds_dirs[0]}"
            ) from e


def zero_shot_classifier(
    model: torch.nn.Module, tokenizer: Any, prompts: Prompts, device: str, amp: bool, chunk: int = 1024
) -> torch.Tensor:
    """Class embeddings as columns (dim x classes), as MetaCLIP's clipeval and clip_benchmark build them.

    Each class: every template filled with every one of its names, each text embedding L2-normalised, their
    mean renormalised. Texts are encoded ``chunk`` at a time across classes (one forward per class is what
    both references do; the result is the same up to float rounding).
    """
    texts, owner = [], []
    for i in range(len(prompts.classes)):
        batch = prompts.class_texts(i)
        texts.extend(batch)
        owner.extend([i] * len(batch))
    sums: torch.Tensor | None = None
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        for start in range(0, len(texts), chunk):
            tokens = tokenizer(texts[start : start + chunk]).to(device)
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
            if sums is None:
                sums = torch.zeros(len(prompts.classes), emb.shape[1], device=emb.device)
            idx = torch.tensor(owner[start : start + chunk], device=emb.device)
            sums.index_add_(0, idx, emb)
    assert sums is not None, "no prompts"
    counts = torch.bincount(torch.tensor(owner), minlength=len(prompts.classes)).to(sums.device)
    return F.normalize(sums / counts[:, None], dim=-1).t()


def image_logits(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    loader: DataLoader,
    device: str,
    amp: bool,
    desc: str,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """100 x cosine(image, class) for every sample (clip_benchmark's ``run_classification``), with images/s."""
    classifier = classifier.to(device)
    logits, targets = [], []
    with torch.no_grad(), tqdm(desc=desc, unit="img", dynamic_ncols=True, leave=False, disable=not progress) as bar:
        for images, target in loader:
            with torch.autocast(device, enabled=amp):
                feats = F.normalize(model.encode_image(images.to(device)), dim=-1)
                logits.append((100.0 * feats @ classifier).float().cpu())
            targets.append(torch.as_tensor(target).cpu())
            bar.update(len(images))
    if not logits:
        raise ValueError(f"{desc}: no samples in the data")
    return torch.cat(logits), torch.cat(targets)


def evaluate_classification(
    task: Task,
    src: DataSource,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    cache: ClassifierCache,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    download: bool = False,
    progress: bool = True,
    prompts: str = METACLIP,
) -> dict[str, Any]:
    """One classification task scored by ``task.metric``, with ``prompts``; the classifier comes from ``cache``."""
    if src.kind == "wds" and is_retrieval_dataset(src.path):
        raise ValueError(f"{task.name}: {src.path} is a retrieval folder (dataset_type.txt) but the task classifies")
    ds = build_dataset(task, src, preprocess, download)
    dataset_classes = getattr(ds, "classes", None) if src.kind == "builder" else None
    chosen = task_prompts(task, src.path, prompts, dataset_classes)
    dev = autocast_device(device)
    clf = cache.get(
        task.name,
        [list(c) for c in chosen.classes],
        list(chosen.templates),
        lambda: zero_shot_classifier(model, tokenizer, chosen, dev, amp),
        prompt_source=chosen.source,
    )
    if src.kind == "wds":  # webdataset hands each worker whole shards; an idle worker fails its empty check
        num_workers = min(num_workers, len(shard_paths(src.path, src.split)))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=dev == "cuda")
    try:
        logits, target = image_logits(model, clf, loader, dev, amp, task.name, progress)
    except (RuntimeError, ValueError) as e:
        if "non-empty" in str(e) or "No samples found" in str(e) or "no samples" in str(e):
            raise ValueError(f"{task.name}: no samples in {src.path / src.split}") from e
        raise
    check_labels(target, len(chosen.classes), chosen.files["classnames"])
    return {
        "task_type": "classification",
        **classification_metrics(logits, target, task.metric),
        "num_samples": len(target),
        "num_classes": len(chosen.classes),
        "num_templates": len(chosen.templates),
        **chosen.record(),
    }


def evaluate_retrieval(
    task: Task,
    src: DataSource,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
    recall_k: Iterable[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Image/text recall@k with clip_benchmark's ``zeroshot_retrieval.evaluate`` and DataComp's mean R@1.

    "image_retrieval" ranks images for each caption, "text_retrieval" captions for each image (a hit
    when any of its captions is in the top k). clip_benchmark's topk fails when k exceeds the number
    of images or captions, so sets that small (smoke tests, tiny testbeds) go through
    :func:`_small_set_recalls`, which mirrors ``evaluate`` with k clamped per direction.
    """
    from clip_benchmark.datasets.builder import build_dataset as cb_build
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    if src.kind != "wds" or not is_retrieval_dataset(src.path):
        raise ValueError(f"{task.name}: {src.path / 'dataset_type.txt'} must say 'retrieval' for a retrieval task")
    shards = shard_paths(src.path, src.split)
    num_workers = min(num_workers, len(shards))  # webdataset gives each worker whole shards
    n_images, n_texts = count_retrieval_pairs(shards)
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"{task.name}: no image-caption pairs in {src.path / src.split}")
    ks = sorted({1, *(int(k) for k in recall_k)})  # R@1 always: it feeds the main metric
    if ks[0] < 1:
        raise ValueError(f"recall_k must be positive integers, got {tuple(recall_k)}")
    with _shardshuffle_unset_ok():
        ds = cb_build(f"wds/{src.path.name}", root=str(src.path), transform=preprocess, split=src.split,
                      task="zeroshot_retrieval")  # fmt: skip
    dev = autocast_device(device)
    collate, pin = image_captions_collate_fn, dev == "cuda"
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin)
    if ks[-1] <= min(n_images, n_texts):
        with _cb_progress(progress):
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
        "main_metric": task.metric,
    }


def _small_set_recalls(
    model: torch.nn.Module, loader: DataLoader, tokenizer: Any, device: str, amp: bool, ks: list[int]
) -> dict[str, float]:
    """clip_benchmark's retrieval ``evaluate`` step for step, with k clamped to each direction's size.

    Recall@k for k >= the number of candidates equals recall at that number (all are retrieved).
    """
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, dataloader_with_indices, recall_at_k

    images_emb, texts_emb, texts_image_index = [], [], []
    for batch_images, batch_texts, inds in dataloader_with_indices(loader):
        tokens = tokenizer([text for texts in batch_texts for text in texts]).to(device)
        texts_image_index.extend(int(i) for i, texts in zip(inds, batch_texts, strict=True) for _ in texts)
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            images_emb.append(F.normalize(model.encode_image(batch_images.to(device)), dim=-1).float().cpu())
            texts_emb.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())
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
