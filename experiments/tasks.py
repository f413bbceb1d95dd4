"""What a sweep can run: one small registry entry per task (config loader, run_point, report writer).

A task is resolved lazily, so ``--task t2i`` gives a clear error while the t2i package is still
being written, and ``--task clip`` never imports the t2i stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption_mixing.provenance import config_hash


class TaskUnavailableError(RuntimeError):
    """The task's modules are not installed or not finished yet."""


@dataclass(frozen=True)
class Task:
    """Everything the sweep needs to know about one task."""

    name: str
    load_config: Callable[[str, dict[str, Any]], Any]
    run_point: Callable[..., dict]
    format_table: Callable[[list[dict]], str]
    write_report: Callable[..., dict]
    run_dir_for: Callable[[Path, Any], Path]
    notice: str | None = None
    distributed_module: str | None = None  # module that sets up torch.distributed from RANK/WORLD_SIZE/...
    preempted: type[BaseException] | None = None  # raised by the trainer after a preemption checkpoint

    def supports_distributed(self) -> bool:
        """Whether multi-process (DDP) jobs work for this task: its training code imports the distributed module.

        (The module existing is not enough: until run_point uses it, N processes would race on one run folder.)
        """
        if self.distributed_module is None or importlib.util.find_spec(self.distributed_module) is None:
            return False
        importlib.import_module(self.run_point.__module__)
        trainer = self.run_point.__module__.rsplit(".", 1)[0] + ".train"
        if importlib.util.find_spec(trainer) is not None:
            importlib.import_module(trainer)
        return self.distributed_module in sys.modules

    def config_hash(self, cfg: Any) -> str:
        """The hash run folders record in config.json (the same one run_point writes)."""
        return config_hash(cfg.to_dict())

    def report(self, runs: list[dict], out: Path, title: str, notice: str | None) -> dict:
        """Write the sweep report with whatever keyword arguments the task's writer accepts."""
        params = inspect.signature(self.write_report).parameters
        kwargs: dict[str, Any] = {}
        if "title" in params:
            kwargs["title"] = title
        if "notice" in params:
            kwargs["notice"] = notice
        return self.write_report(runs, out, **kwargs)


def _clip() -> Task:
    import clip_train.train as train_mod
    from clip_train.config import load_config
    from clip_train.experiment import TESTBED_NOTICE, run_dir_for, run_point
    from eval.report import format_table, write_sweep_report

    return Task(
        name="clip",
        load_config=load_config,
        run_point=run_point,
        format_table=format_table,
        write_report=write_sweep_report,
        run_dir_for=run_dir_for,
        notice=TESTBED_NOTICE,
        distributed_module="clip_train.distributed",
        preempted=getattr(train_mod, "Preempted", None),
    )


def _t2i() -> Task:
    missing = []
    found: dict[str, Any] = {}
    for module, attr in (
        ("t2i.config", "load_config"),
        ("t2i.experiment", "run_point"),
        ("t2i.report", "write_t2i_report"),
        ("t2i.report", "format_table"),
    ):
        try:
            found[attr] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{attr} ({type(e).__name__}: {e})")
    if missing:
        raise TaskUnavailableError(
            "--task t2i: the text-to-image task is not available yet; missing " + "; ".join(missing)
        )
    experiment = importlib.import_module("t2i.experiment")

    def run_dir_for(out: Path, cfg: Any) -> Path:
        return Path(out) / f"t2i-{Path(getattr(cfg, 'preset', None) or 'custom').stem}-p{cfg.p:g}"

    train_mod = importlib.import_module("t2i.train") if importlib.util.find_spec("t2i.train") else None
    return Task(
        name="t2i",
        load_config=found["load_config"],
        run_point=found["run_point"],
        format_table=found["format_table"],
        write_report=found["write_t2i_report"],
        run_dir_for=getattr(experiment, "run_dir_for", run_dir_for),
        notice=getattr(experiment, "TESTBED_NOTICE", None),
        distributed_module="t2i.distributed",
        preempted=getattr(train_mod, "Preempted", None) if train_mod else None,
    )


TASKS: dict[str, Callable[[], Task]] = {"clip": _clip, "t2i": _t2i}


def get_task(name: str) -> Task:
    """Resolve a task by name; TaskUnavailableError says what is missing."""
    if name not in TASKS:
        raise TaskUnavailableError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
