"""What a sweep can run: one small registry entry per task (config loader, run_point, report writer).

Tasks are resolved lazily, so ``--task clip`` never imports the diffusers stack.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption_mixing.provenance import config_hash


@dataclass(frozen=True)
class Task:
    """Everything the sweep needs to know about one task."""

    name: str
    load_config: Callable[[str, dict[str, Any]], Any]
    run_point: Callable[..., dict]
    format_table: Callable[[list[dict]], str]
    write_report: Callable[..., dict]
    run_dir_for: Callable[[Path, Any], Path]
    notice: str

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
    )


def _t2i() -> Task:
    from t2i.config import load_config
    from t2i.experiment import TESTBED_NOTICE, run_dir_for, run_point
    from t2i.report import format_table, write_t2i_report

    return Task(
        name="t2i",
        load_config=load_config,
        run_point=run_point,
        format_table=format_table,
        write_report=write_t2i_report,
        run_dir_for=run_dir_for,
        notice=TESTBED_NOTICE,
    )


TASKS: dict[str, Callable[[], Task]] = {"clip": _clip, "t2i": _t2i}


def get_task(name: str) -> Task:
    """Resolve a task by name."""
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
