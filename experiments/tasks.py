"""What a sweep can run: one small registry entry per task (config loader, run_point, report writer).

Tasks are resolved lazily, so ``--task clip`` never imports the diffusers stack. The sweep resolves
each point's config once (``load_config``) and ships its fields to the job (``config_dict``); the
job rebuilds the same config from them (``from_dict``), so p and every other value travel once.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption_mixing.provenance import config_hash
from training.rundir import TESTBED_NOTICE

DERIVED_KEYS = ("steps",)  # in a config's to_dict, computed from other fields


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
    preset_dir: Path  # the task's presets (their ``job:`` blocks give the job shape)

    def config_hash(self, cfg: Any) -> str:
        """The hash run folders record in config.json (the same one run_point writes)."""
        return config_hash(cfg.to_dict())

    def config_dict(self, cfg: Any) -> dict[str, Any]:
        """The resolved config as plain values: its dataclass fields (``to_dict`` less derived keys)."""
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

    def from_dict(self, values: dict[str, Any]) -> Any:
        """The config ``config_dict`` describes, rebuilt through the task's own loader and checks.

        Every field is given as an override of its preset (``preset`` names it), so nothing is
        read from the preset but its name; keys that are not fields (``steps``) are derived and dropped.
        """
        fields = dict(values)
        preset = fields.pop("preset", None)
        if preset is None:
            raise ValueError(f"task {self.name}: a config dict without 'preset' cannot be rebuilt")
        overrides = {k: v for k, v in fields.items() if k not in DERIVED_KEYS}
        return self.load_config(preset, overrides)

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
    from clip_train.config import PRESET_DIR, load_config
    from clip_train.experiment import run_dir_for, run_point
    from eval.seed_report import format_table, write_sweep_report

    return Task(
        name="clip",
        load_config=load_config,
        run_point=run_point,
        format_table=format_table,
        write_report=write_sweep_report,
        run_dir_for=run_dir_for,
        notice=TESTBED_NOTICE,
        preset_dir=PRESET_DIR,
    )


def _t2i() -> Task:
    from t2i.config import PRESET_DIR, load_config
    from t2i.experiment import run_dir_for, run_point
    from t2i.report import format_table, write_t2i_report

    return Task(
        name="t2i",
        load_config=load_config,
        run_point=run_point,
        format_table=format_table,
        write_report=write_t2i_report,
        run_dir_for=run_dir_for,
        notice=TESTBED_NOTICE,
        preset_dir=PRESET_DIR,
    )


TASKS: dict[str, Callable[[], Task]] = {"clip": _clip, "t2i": _t2i}


def get_task(name: str) -> Task:
    """Resolve a task by name."""
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
