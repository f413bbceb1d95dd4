"""The one evaluation path: run a list of tasks on one loaded model, scored by each task's registry metric.

``python -m eval zeroshot`` and the training applications (quick eval during training, final eval of a
sweep point) all call :func:`run_suite` with tasks from ``eval.tasks.parse_task_spec``. Tasks whose data
is absent are recorded as missing with every path looked for, and every average says over how many tasks
it was taken ("avg over 23/26"). ``eval.preflight.check_tasks`` checks the same tasks without a model,
before any training or model loading.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json
from eval.association import evaluate_association
from eval.classifier_cache import ClassifierCache
from eval.locate import locate, missing_report
from eval.prompts import METACLIP, check_prompt_source
from eval.results import summarize
from eval.tasks import Task
from eval.zeroshot import evaluate_classification, evaluate_retrieval


def run_task(
    task: Task,
    dataset_root: str | Path | None,
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
    """Locate and evaluate one task; a task without data becomes a "missing" record, not an exception.

    The result records the precision, the split and sample count read, the standard split's count
    (``expected_samples``) and, when they differ, a ``size_note`` saying so.
    """
    src = locate(task, dataset_root, download=download)
    if src is None:
        return missing_report(task, dataset_root)
    t0 = time.perf_counter()
    kw = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "amp": amp, "progress": progress}
    if task.kind == "retrieval":
        result = evaluate_retrieval(task, src, model, tokenizer, preprocess, **kw)
    elif task.kind == "association":
        result = evaluate_association(task, src, model, tokenizer, preprocess, **kw)
    else:
        result = evaluate_classification(
            task, src, model, tokenizer, preprocess, cache, download=download, prompts=prompts, **kw
        )
    result.update(status="ok", precision="amp" if amp else "fp32", path=str(src.path), split=src.split)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if src.split_note:
        result["split_note"] = src.split_note
    if task.expected_samples:
        result["expected_samples"] = task.expected_samples
        if result["num_samples"] != task.expected_samples:
            n, want = result["num_samples"], task.expected_samples
            what = "instances" if task.kind == "association" else "images"
            note = f"the standard {task.paper_split} split has {want} {what}; {src.path} has {n}"
            result["size_note"] = note + (f" ({task.count_note})" if task.count_note else "")
    return result


def run_suite(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    tasks: Sequence[Task],
    dataset_root: str | Path | None,
    *,
    cache: ClassifierCache | None = None,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    download: bool = False,
    keep_going: bool = False,
    progress: bool = True,
    prompts: str = METACLIP,
) -> dict[str, Any]:
    """Evaluate ``tasks`` in order -> ``{"tasks": {name: result}, "summary": eval.results.summarize(...)}``.

    ``cache=None`` uses a fresh in-memory classifier cache (right for a model whose weights change between
    calls, as in training). Per-task JSON goes to ``out_dir/tasks/<name>.json`` as each task finishes. A
    failing task raises naming it, or with ``keep_going`` is recorded as an error. The model is evaluated
    under ``torch.no_grad`` in eval mode, in fp32 unless ``amp``, and left in the mode it came in.
    Classification tasks use ``prompts`` ("metaclip", the default, or "clip_benchmark"; ``eval.prompts``).
    """
    check_prompt_source(prompts, "prompts")
    cache = cache if cache is not None else ClassifierCache("in-memory (no model id)")
    kw = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "amp": amp, "progress": progress}
    kw["prompts"] = prompts
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for task in tqdm(tasks, desc="tasks", unit="task", dynamic_ncols=True, disable=not progress):
                res = _run_or_record(
                    task, dataset_root, model, tokenizer, preprocess, cache, keep_going, download=download, **kw
                )
                results[task.name] = res
                if progress:
                    tqdm.write(_log_line(task, res))
                if out_dir is not None:
                    atomic_write_json(Path(out_dir) / "tasks" / f"{task.name}.json", {"task": task.name, **res})
    finally:
        model.train(was_training)
    summary = summarize(results)
    summary["classifier_cache"] = {"hits": cache.hits, "misses": cache.misses}
    summary["prompts"] = prompts
    return {"tasks": results, "summary": summary}


def _run_or_record(
    task: Task,
    dataset_root: str | Path | None,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    cache: ClassifierCache,
    keep_going: bool,
    **kw: Any,
) -> dict[str, Any]:
    """``run_task``; its failure names the task, or becomes an "error" record when ``keep_going``."""
    try:
        return run_task(task, dataset_root, model, tokenizer, preprocess, cache, **kw)
    except (ValueError, RuntimeError, OSError) as e:
        if keep_going:
            return {"status": "error", "error": f"{type(e).__name__}: {e}", "main_metric": task.metric}
        if isinstance(e, ValueError) and not str(e).startswith(f"{task.name}:"):
            raise ValueError(f"{task.name}: {e}") from e  # say which task, on the command line too
        raise


def _log_line(task: Task, res: dict[str, Any]) -> str:
    if res["status"] == "missing":
        return f"[eval] {task.name}: MISSING (looked for {', '.join(res['looked_for'])})"
    if res["status"] == "error":
        return f"[eval] {task.name}: ERROR {res['error']}"
    key = res["main_metric"]
    notes = "".join(f"; {res[n]}" for n in ("split_note", "size_note", "prompt_note") if n in res)
    return f"[eval] {task.name}: {key}={100 * res[key]:.2f} ({res['num_samples']} samples, {res['seconds']}s{notes})"
