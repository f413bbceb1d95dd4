"""Which tasks a CLIP run is evaluated on, checked before training, and run through ``eval.runner``.

One evaluation path: the quick eval during training and the final evaluation of a sweep point
both call ``eval.runner.run_suite`` on tasks from ``eval.tasks.parse_task_spec``, so every task is
scored by its registry metric and ``metrics.json`` has the schema ``python -m eval zeroshot``
writes. ``eval_tasks: embedded`` is the registry group ``testbed`` read from the testbed's
``eval`` folder. ``check`` runs ``eval.preflight.check_tasks`` before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from clip_train.config import ClipTrainConfig
from eval.preflight import check_tasks
from eval.results import main_metric_value
from eval.runner import run_suite
from eval.tasks import Task, parse_task_spec

EMBEDDED = "embedded"


@dataclass(frozen=True)
class EvalPlan:
    """Tasks, the root registry tasks are looked for under, whether missing data is tolerated, precision."""

    tasks: tuple[Task, ...] = ()
    dataset_root: str | None = None
    keep_going: bool = False
    amp: bool = False

    @property
    def precision(self) -> str:
        return "amp" if self.amp else "fp32"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def eval_plan(cfg: ClipTrainConfig, testbed_root: Path | None) -> EvalPlan:
    """The run's evaluation: ``embedded`` = the testbed group under ``<testbed>/eval``; else a task spec."""
    if not cfg.eval_tasks:
        return EvalPlan(keep_going=cfg.eval_keep_going, amp=cfg.eval_amp)
    if cfg.eval_tasks == EMBEDDED:
        if testbed_root is None:
            raise ValueError("eval_tasks=embedded needs the embedded testbed, and none was loaded")
        tasks, root = tuple(parse_task_spec("testbed", "eval_tasks")), str(testbed_root / "eval")
    else:
        tasks, root = tuple(parse_task_spec(cfg.eval_tasks, "eval_tasks")), cfg.eval_dataset_root
    return EvalPlan(tasks, root, cfg.eval_keep_going, cfg.eval_amp)


def plan_from_config(cfg: ClipTrainConfig, testbed_dir: str | None = None) -> EvalPlan:
    """``eval_plan`` loading the embedded testbed only when ``eval_tasks`` names it."""
    if cfg.eval_tasks != EMBEDDED:
        return eval_plan(cfg, None)
    from testbed import load_testbed

    return eval_plan(cfg, load_testbed(testbed_dir).root)


def quick_plan(cfg: ClipTrainConfig, plan: EvalPlan) -> EvalPlan:
    """The quick-eval subset (``quick_eval_tasks``, default all); a name not in ``eval_tasks`` is an error."""
    if not cfg.quick_eval_tasks:
        return plan
    names = [n.strip() for n in cfg.quick_eval_tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in plan.names]
    if unknown:
        known = ", ".join(plan.names) or "none"
        raise ValueError(f"quick_eval_tasks: {unknown} not among eval_tasks ({known})")
    return replace(plan, tasks=tuple(t for t in plan.tasks if t.name in names))


def check(cfg: ClipTrainConfig, plan: EvalPlan) -> list[str]:
    """Every eval task's folder and class names, before training; raises unless ``eval_keep_going``.

    With ``eval_keep_going`` the problems are printed and returned: those tasks are reported as
    missing or failed in ``metrics.json``, and the average says over how many tasks it was taken.
    """
    quick_plan(cfg, plan)  # a quick-eval name outside eval_tasks is a typo: stop now, not at step eval_every
    if not plan.tasks:
        return []
    try:
        problems = check_tasks(plan.tasks, plan.dataset_root, keep_going=plan.keep_going)
    except ValueError as exn:
        raise ValueError(f"eval_tasks={cfg.eval_tasks!r}: {exn}; the opt-in is --set eval_keep_going=true") from exn
    for line in problems:
        print(f"[eval] eval_keep_going: {line}", flush=True)
    return problems


def run_eval(
    plan: EvalPlan, model: torch.nn.Module, tokenizer: Any, preprocess: Any, device: str, progress: bool
) -> dict:
    """``run_suite`` on the plan's tasks, in the plan's precision (fp32 unless ``eval_amp``, as ``eval zeroshot``)."""
    return run_suite(
        model,
        tokenizer,
        preprocess,
        list(plan.tasks),
        plan.dataset_root,
        device=device,
        amp=plan.amp,
        keep_going=plan.keep_going,
        progress=progress,
    )


def quick_eval_record(suite: dict, step: int) -> tuple[dict[str, Any], dict[str, float]]:
    """(``train_log.jsonl`` record, TensorBoard scalars) of a quick eval: each task's registry metric."""
    values = {name: main_metric_value(res, name) for name, res in suite["tasks"].items()}
    scalars = {f"eval/{name}": v for name, v in values.items() if v is not None}
    average = suite["summary"].get("average")
    if average is not None:
        scalars["eval/average"] = average
    return {"step": step, "eval": values, "eval_average_over": suite["summary"]["average_over"]}, scalars
