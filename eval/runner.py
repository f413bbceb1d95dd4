"""Run a list of registry tasks on one loaded model; write per-task JSON and a summary.

The model is loaded once by the caller; each task's classifier comes from a ``ClassifierCache``.
Tasks whose data is absent are recorded as missing with every path looked for, and every average
says over how many tasks it was taken ("avg over 23/26").
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json
from eval.classifier_cache import ClassifierCache
from eval.datacomp import group_averages
from eval.locate import DataSource, locate, missing_report
from eval.metrics import classification_metrics
from eval.prompts import folder_prompts
from eval.tasks import PAPER26, Task
from eval.zeroshot import (
    _autocast_device,
    _check_labels,
    _shard_paths,
    evaluate_retrieval,
    is_retrieval_dataset,
    main_metric_value,
    summarize,
)


def _build(task: Task, src: DataSource, preprocess: Any, download: bool) -> Any:
    """clip_benchmark's dataset for ``src``: its local-wds reader, or its torchvision builder (offline)."""
    from clip_benchmark.datasets.builder import build_dataset, build_wds_dataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
        if src.kind == "wds":
            _shard_paths(src.path, src.split)
            # build_wds_dataset, not build_dataset: the latter asserts on a missing classnames.txt, while we fall
            # back to the packaged lists (folder_prompts) and record which source was used
            with contextlib.redirect_stdout(io.StringIO()):  # its "classnames.txt not found" notices
                return build_wds_dataset(f"wds/{src.path.name}", preprocess, split=src.split, data_dir=str(src.path))
        try:
            return build_dataset(
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
    model: torch.nn.Module, tokenizer: Any, classnames: list[str], templates: list[str], device: str, amp: bool
) -> torch.Tensor:
    """clip_benchmark's classifier: mean of L2-normalised template embeddings per class, renormalised."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier as cb_classifier

    return cb_classifier(model, tokenizer, classnames, templates, device, amp=amp)


def image_logits(
    model: torch.nn.Module, classifier: torch.Tensor, loader: DataLoader, device: str, amp: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """100 x cosine(image, class) for every sample (clip_benchmark's ``run_classification``), with images/s."""
    classifier = classifier.to(device)
    logits, targets = [], []
    with torch.no_grad(), tqdm(desc=desc, unit="img", dynamic_ncols=True, leave=False) as bar:
        for images, target in loader:
            with torch.autocast(device, enabled=amp):
                feats = F.normalize(model.encode_image(images.to(device)), dim=-1)
                logits.append((100.0 * feats @ classifier).float().cpu())
            targets.append(torch.as_tensor(target).cpu())
            bar.update(len(images))
    if not logits:
        raise ValueError(f"{desc}: no samples in the data")
    return torch.cat(logits), torch.cat(targets)


def evaluate_classification_task(
    task: Task,
    src: DataSource,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    cache: ClassifierCache,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    amp: bool,
    download: bool = False,
) -> dict[str, Any]:
    """One classification task with the registry's metric; classifier from the cache."""
    ds = _build(task, src, preprocess, download)
    dataset_classes = getattr(ds, "classes", None) if src.kind == "builder" else None
    classnames, templates, sources = folder_prompts(src.path, task.prompt_key, dataset_classes)
    dev = _autocast_device(device)
    clf = cache.get(
        task.name,
        classnames,
        templates,
        lambda: zero_shot_classifier(model, tokenizer, classnames, templates, dev, amp),
    )
    if src.kind == "wds":  # webdataset hands each worker whole shards; an idle worker fails its empty check
        num_workers = min(num_workers, len(_shard_paths(src.path, src.split)))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=dev == "cuda")
    try:
        logits, target = image_logits(model, clf, loader, dev, amp, task.name)
    except (RuntimeError, ValueError) as e:
        if "non-empty" in str(e) or "No samples found" in str(e) or "no samples" in str(e):
            raise ValueError(f"{task.name}: no samples in {src.path / src.split}") from e
        raise
    _check_labels(target, len(classnames), Path(sources["classnames"]))
    return {
        "task_type": "classification",
        **classification_metrics(logits, target, task.metric),
        "num_samples": len(target),
        "num_classes": len(classnames),
        "num_templates": len(templates),
        "prompt_sources": sources,
    }


def evaluate_retrieval_task(
    task: Task,
    src: DataSource,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    amp: bool,
) -> dict[str, Any]:
    """Recall@1/5/10 both directions and DataComp's mean_recall@1 on a local-wds retrieval folder."""
    if src.kind != "wds" or not is_retrieval_dataset(src.path):
        raise ValueError(f"{task.name}: {src.path / 'dataset_type.txt'} must say 'retrieval' for a retrieval task")
    return evaluate_retrieval(
        model,
        tokenizer,
        preprocess,
        src.path,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        split=src.split,
    )


def run_task(
    task: Task,
    dataset_root: str | Path,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    cache: ClassifierCache,
    *,
    download: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """Locate and evaluate one task; a task without data becomes a "missing" record, not an exception."""
    src = locate(task, dataset_root, download=download)
    if src is None:
        return missing_report(task, dataset_root)
    t0 = time.perf_counter()
    if task.kind == "retrieval":
        result = evaluate_retrieval_task(task, src, model, tokenizer, preprocess, **kw)
    else:
        result = evaluate_classification_task(task, src, model, tokenizer, preprocess, cache, download=download, **kw)
    result.update(status="ok", path=str(src.path), split=src.split, seconds=round(time.perf_counter() - t0, 3))
    if src.split_note:
        result["split_note"] = src.split_note
    if task.expected_samples and result["num_samples"] != task.expected_samples:
        n, want = result["num_samples"], task.expected_samples
        result["size_note"] = f"the paper's split has {want} images; {src.path} has {n}"
    return result


def summarize_suite(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``summarize`` plus the 26-task average with its coverage and the DataComp groups."""
    summary = summarize(results)
    summary["average_over"] = f"{summary['num_tasks_averaged']}/{summary['num_tasks']}"
    paper = {t: results[t] for t in PAPER26 if t in results}
    if paper:
        vals = [v for v in (main_metric_value(r) for r in paper.values()) if v is not None]
        summary["paper26"] = {
            "average": sum(vals) / len(vals) if vals else math.nan,
            "num_tasks_averaged": len(vals),
            "average_over": f"{len(vals)}/{len(PAPER26)}",
            "missing": [t for t in PAPER26 if main_metric_value(results.get(t, {"status": "missing"})) is None],
        }
    summary["datacomp_groups"] = group_averages(results)
    summary["errors"] = {n: r["error"] for n, r in results.items() if r.get("status") == "error"}
    return summary


def run_suite(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    tasks: Sequence[Task],
    dataset_root: str | Path,
    *,
    cache: ClassifierCache,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool | None = None,
    download: bool = False,
    keep_going: bool = False,
) -> dict[str, Any]:
    """Evaluate ``tasks`` in order; per-task JSON goes to ``out_dir/tasks/`` as each finishes."""
    amp = str(device).startswith("cuda") if amp is None else amp
    kw = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "amp": amp}
    results: dict[str, dict[str, Any]] = {}
    model.eval()
    for task in tqdm(tasks, desc="tasks", unit="task", dynamic_ncols=True):
        try:
            res = run_task(task, dataset_root, model, tokenizer, preprocess, cache, download=download, **kw)
        except (ValueError, RuntimeError, OSError) as e:
            if not keep_going and isinstance(e, ValueError) and not str(e).startswith(f"{task.name}:"):
                raise ValueError(f"{task.name}: {e}") from e  # say which task, on the command line too
            if not keep_going:
                raise
            res = {"status": "error", "error": f"{type(e).__name__}: {e}", "main_metric": task.metric}
        results[task.name] = res
        _log(task, res)
        if out_dir is not None:
            doc = {"task": task.name, **res}
            atomic_write_json(Path(out_dir) / "tasks" / f"{task.name}.json", _nan_to_none(doc))
    summary = summarize_suite(results)
    summary["classifier_cache"] = {"hits": cache.hits, "misses": cache.misses}
    return {"tasks": results, "summary": summary}


def _nan_to_none(doc: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON for per-task files: acc5 is NaN below 5 classes (clip_benchmark's convention)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in doc.items()}


def _log(task: Task, res: dict[str, Any]) -> None:
    if res["status"] == "missing":
        tqdm.write(f"[eval] {task.name}: MISSING (looked for {', '.join(res['looked_for'])})")
    elif res["status"] == "error":
        tqdm.write(f"[eval] {task.name}: ERROR {res['error']}")
    else:
        key = res["main_metric"]
        notes = "".join(f"; {res[n]}" for n in ("split_note", "size_note") if n in res)
        tqdm.write(
            f"[eval] {task.name}: {key}={100 * res[key]:.2f} ({res['num_samples']} samples, {res['seconds']}s{notes})"
        )
