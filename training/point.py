"""One point of a sweep, the same skeleton for every application: check the run folder, resolve
data, check evaluation inputs, train, evaluate, write ``metrics.json``.

An application supplies a ``PointApp`` (what differs: its data, its trainer, its evaluation);
this module supplies what must not differ: reuse and refusal of folders, rank-0-first resolution
(so only rank 0 builds the embedded testbed), metadata, timings, the counts a checkpoint carries,
and a strict-JSON ``metrics.json`` written atomically. Under torchrun, srun or accelerate every
rank calls ``run_point``: all ranks train, rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from caption_mixing.atomic import atomic_write_json
from caption_mixing.mixconfig import run_label
from training.checkpoint import load_checkpoint
from training.device import cpu_threads
from training.distributed import DistEnv, barrier, init_distributed
from training.rundir import DONE, TESTBED_NOTICE, check_run_dir, write_run_metadata

T = TypeVar("T")


class PointApp(Protocol):
    """What an application provides to run one point."""

    def run_dir(self, out: Path, cfg: Any) -> Path: ...

    def resolve(self, cfg: Any, testbed_dir: str | None) -> Any:
        """Data and components (builds the embedded testbed if needed); must expose ``uses_testbed``."""

    def preflight(self, cfg: Any, resolved: Any) -> None:
        """Raise before training when evaluation inputs are broken (wrong class names, missing folders)."""

    def train(self, cfg: Any, run_dir: Path, resolved: Any) -> Path:
        """Train (resuming if possible) and return the last checkpoint."""

    def evaluate(self, cfg: Any, run_dir: Path, ckpt: Path, resolved: Any) -> dict[str, Any]:
        """Rank 0: the application's metrics for the final checkpoint."""


def main_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the other ranks (which then reuse what rank 0 built)."""
    if env.is_main:
        result = fn()
    barrier(env)
    if not env.is_main:
        result = fn()
    return result


def run_point(app: PointApp, cfg: Any, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """Train and evaluate one point; return its metrics (also in ``metrics.json``). Other ranks get a stub."""
    env = init_distributed(cfg.device)
    with cpu_threads(env.device, cfg.workers):
        t0 = time.perf_counter()
        run_dir = app.run_dir(out, cfg)
        if check_run_dir(run_dir, cfg.to_dict(), force) == DONE:
            print(f"{run_dir}: finished earlier with the same config; reusing its metrics.json")
            return json.loads((run_dir / "metrics.json").read_text())
        barrier(env)  # every rank has read the folder's state before rank 0 writes to it
        resolved = main_first(env, lambda: app.resolve(cfg, testbed_dir))
        app.preflight(cfg, resolved)  # before anything is written: a broken eval set stops here
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_metadata(run_dir, cfg.to_dict(), cfg.seed)
        barrier(env)
        prepare_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        ckpt = app.train(cfg, run_dir, resolved)
        train_s = time.perf_counter() - t1
        if not env.is_main:
            return {"rank": env.rank, "checkpoint": str(ckpt)}
        t2 = time.perf_counter()
        metrics = app.evaluate(cfg, run_dir, ckpt, resolved)
        eval_s = time.perf_counter() - t2
        saved = load_checkpoint(ckpt)
        metrics.update(
            p=cfg.p,
            label=run_label(cfg),  # "p=0.15", "p=0.15 gate", "both w=0.5" (caption_mixing.mixconfig)
            seed=cfg.seed,
            checkpoint=str(ckpt.relative_to(run_dir)),
            steps=saved["step"],
            mixing=saved["mixing"],
            data_errors=saved.get("data_errors", {}),
            prepare_seconds=round(prepare_s, 1),
            train_seconds=round(train_s, 1),
            eval_seconds=round(eval_s, 1),
            device=env.device,
            world_size=env.world_size,
            torch_threads=torch.get_num_threads(),
        )
        if resolved.uses_testbed:
            metrics["notice"] = TESTBED_NOTICE
        atomic_write_json(run_dir / "metrics.json", metrics)
        return metrics
