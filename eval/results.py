"""Per-task results -> summaries and the ``metrics.json`` document every evaluation writes.

``python -m eval zeroshot --p P`` and the training sweep write the same document,
:func:`metrics_document` (``eval.report`` / ``eval.paper_report`` read it back). Schema, version 1::

    {
      "schema": "caption-mixing/metrics/1",
      ...extra fields given by the writer (p, label, model, checkpoint, steps, mixing, device, ...),
      "tasks": {                                   # one entry per task, in evaluation order
        "<task>": {                                # status "ok": the task ran
          "status": "ok", "main_metric": "<key>",  # the registry's metric for the task (eval.tasks)
          "<key>": float,                          # fractions in [0, 1]: acc1, acc5, mean_per_class_recall,
                                                   #   top1_top5_mean, roc_auc, mean_recall@1, *_recall@k,
                                                   #   avg_jaccard_score, jaccard_score_<n> (WinoGAViL)
          "task_type": "classification" | "retrieval" | "association", "precision": "fp32" | "amp",
          "num_samples": int, "path": str, "split": str, "seconds": float,
          "expected_samples": int, "size_note": str,  # the standard split's size; the note when they differ
          "prompt_source": "metaclip" | "clip_benchmark" | "folder",   # classification only, with
          "prompt_sources": {"classnames": str, "templates": str}, "prompt_note": str, ...
        },
        "<task>": {"status": "missing", "main_metric": ..., "path": str, "looked_for": [str], "reason": str},
        "<task>": {"status": "error", "main_metric": ..., "error": str}      # only with keep_going
      },
      "summary": {
        "average": float | null,                   # unweighted mean of the main metrics that ran
        "average_note": str,                       # only when average is null: why
        "num_tasks_averaged": int, "num_tasks": int, "average_over": "k/N",
        "missing": [task], "errors": {task: str},
        "paper26": {"average", "num_tasks_averaged", "average_over": "k/26", "missing"},  # if any of the 26 ran
        "datacomp_groups": {"IN dist. shift" | "VTAB" | "Retrieval":
                            {"average", "num_members", "num_total", "coverage": "k/n", "missing"}},
        "testbed_groups": {"concepts" | "attributes" | "retrieval": {...as above}},  # if a testbed task ran
        "classifier_cache": {"hits": int, "misses": int}, "prompts": "metaclip" | "clip_benchmark"
      }
    }

No value is ever NaN: a value eval cannot compute is null with a ``<key>_note`` giving the reason
(``acc5_note``, ``average_note``), and the document passes through ``caption_mixing.atomic.json_safe``,
the project's one NaN -> null sanitiser (which ``atomic_write_json`` also applies to every JSON file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from caption_mixing.atomic import json_safe
from eval.tasks import DATACOMP_GROUPS, PAPER26, REGISTRY, TESTBED_GROUPS

SCHEMA = "caption-mixing/metrics/1"


def main_metric_value(result: Mapping[str, Any], task: str | None = None) -> float | None:
    """The task's main metric, or None when the task is missing, failed or lacks it.

    For a registry task the registry decides the metric, so an older file that recorded top-1 as the
    main metric of, say, Aircraft is still reported by mean per-class recall when it holds that value.
    """
    if result.get("status", "ok") != "ok":
        return None
    metric = REGISTRY[task].metric if task in REGISTRY else result.get("main_metric")
    value = result.get(metric) if metric else None
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def group_averages(
    results: Mapping[str, Mapping[str, Any]], groups: Mapping[str, tuple[str, ...]] = DATACOMP_GROUPS
) -> dict[str, dict[str, Any]]:
    """DataComp groups (or ``groups``): unweighted mean of the members that ran, with coverage ("2/3")
    and missing members.

    A group average over fewer members than the group has is not DataComp's number, hence the coverage.
    """
    out: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        values = {m: main_metric_value(results[m], m) for m in members if m in results}
        present = [m for m, v in values.items() if v is not None]
        info: dict[str, Any] = {
            "average": _mean([values[m] for m in present]),  # type: ignore[misc]
            "num_members": len(present),
            "num_total": len(members),
            "coverage": f"{len(present)}/{len(members)}",
            "missing": [m for m in members if m not in present],
        }
        if not present:
            info["average_note"] = "no member of the group was evaluated"
        out[group] = info
    return out


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Average over the tasks that ran (missing ones listed, not hidden), the 26-task average, DataComp groups."""
    values = {n: main_metric_value(r, n) for n, r in results.items()}
    ran = [v for v in values.values() if v is not None]
    summary: dict[str, Any] = {
        "average": _mean(ran),
        "num_tasks_averaged": len(ran),
        "num_tasks": len(results),
        "average_over": f"{len(ran)}/{len(results)}",
        "missing": [n for n, r in results.items() if r.get("status") == "missing"],
        "errors": {n: r.get("error", "") for n, r in results.items() if r.get("status") == "error"},
    }
    if not ran:
        summary["average_note"] = "no task ran" if results else "no task was given"
    if any(t in results for t in PAPER26):
        paper = [values[t] for t in PAPER26 if values.get(t) is not None]
        summary["paper26"] = {
            "average": _mean(paper),  # type: ignore[arg-type]
            "num_tasks_averaged": len(paper),
            "average_over": f"{len(paper)}/{len(PAPER26)}",
            "missing": [t for t in PAPER26 if values.get(t) is None],
        }
        if not paper:
            summary["paper26"]["average_note"] = "none of the 26 tasks ran"
    summary["datacomp_groups"] = group_averages(results)
    if any(t in results for members in TESTBED_GROUPS.values() for t in members):
        summary["testbed_groups"] = group_averages(results, TESTBED_GROUPS)
    return summary


def metrics_document(suite_result: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``metrics.json`` document (schema above) for ``run_suite``'s result plus the writer's fields."""
    clash = {"schema", "tasks", "summary"} & set(extra)
    if clash:
        raise ValueError(f"metrics_document: extra fields {sorted(clash)} would overwrite the document's own")
    tasks = suite_result["tasks"]
    summary = suite_result.get("summary") or summarize(tasks)
    return json_safe({"schema": SCHEMA, **extra, "tasks": tasks, "summary": summary})
