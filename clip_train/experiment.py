"""One point of a ratio sweep: resolve data, train, evaluate zero-shot, write ``metrics.json``.

The run folder is the unit of reproducibility and idempotency: it holds the resolved config
(with its hash), provenance, checkpoints, the training log and the metrics. A folder whose
metrics exist for the same config is reused; one made by a different config is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from caption_mixing.atomic import atomic_write_json
from caption_mixing.provenance import config_hash, write_run_metadata
from clip_train.checkpoint import load_checkpoint, load_model_state
from clip_train.config import ClipTrainConfig
from clip_train.distributed import barrier, init_distributed
from clip_train.model import create_model
from clip_train.train import train

TESTBED_NOTICE = "Embedded synthetic testbed: numbers exercise the suite and are not paper results."


class RunConflictError(RuntimeError):
    pass


def load_testbed(testbed_dir: str | None = None):
    """The embedded testbed: a folder the user points at is used as built (any size); otherwise
    the default one is built or reused."""
    from caption_mixing.testbed import Testbed, ensure_testbed

    if testbed_dir and (Path(testbed_dir) / "testbed.json").exists():
        return Testbed.load(testbed_dir)
    return ensure_testbed(testbed_dir)


class Data(NamedTuple):
    shards: str  # train shard pattern
    tasks: dict[str, str]  # eval task name -> folder
    uses_testbed: bool
    num_samples: int | None  # the training set's size when known (the testbed's)


def resolve_data(cfg: ClipTrainConfig, testbed_dir: str | None = None) -> Data:
    """Where a config's training and eval data are (the testbed is loaded at most once)."""
    uses_testbed = cfg.train_shards == "embedded" or cfg.eval_tasks == "embedded"
    testbed = load_testbed(testbed_dir) if uses_testbed else None
    shards = testbed.train_shards if cfg.train_shards == "embedded" else cfg.train_shards
    if cfg.eval_tasks == "embedded":
        tasks = {name: str(path) for name, path in testbed.eval_tasks.items()}
    elif cfg.eval_tasks:
        tasks = {}
        for item in cfg.eval_tasks.split(","):
            if "=" not in item:
                raise ValueError(f"eval_tasks: {item!r} is not name=path")
            name, path = item.split("=", 1)
            tasks[name.strip()] = path.strip()
    else:
        tasks = {}
    num_samples = testbed.num_train if cfg.train_shards == "embedded" else None
    return Data(shards, tasks, uses_testbed, num_samples)


def run_dir_for(out: Path, cfg: ClipTrainConfig) -> Path:
    return Path(out) / f"clip-{Path(cfg.preset or 'custom').stem}-p{cfg.p:g}"


def check_run_dir(run_dir: Path, cfg: ClipTrainConfig, force: bool) -> str:
    """'new', 'resume' or 'done'; refuse a folder written by a different config unless forced."""
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        return "new"
    saved = json.loads(cfg_file.read_text())
    if saved.get("config_hash") != config_hash(cfg.to_dict()) and not force:
        raise RunConflictError(
            f"{run_dir} was made by a different config (hash {saved.get('config_hash')} vs "
            f"{config_hash(cfg.to_dict())}); use another --out or --force"
        )
    return "done" if (run_dir / "metrics.json").exists() and not force else "resume"


def evaluate_checkpoint(cfg: ClipTrainConfig, ckpt: Path, tasks: dict[str, str]) -> dict:
    from eval.zeroshot import evaluate_tasks, summarize

    device = init_distributed(cfg.device).device
    model, _, preprocess_val, tokenizer = create_model(cfg.model, device=device)
    load_model_state(model, load_checkpoint(ckpt), cfg.model, ckpt)
    results = evaluate_tasks(model, tokenizer, preprocess_val, tasks, device=device)
    return {"tasks": results, "summary": summarize(results)}


def run_point(cfg: ClipTrainConfig, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """Train and evaluate one p; return the metrics dict (also written to ``metrics.json``).

    Under torchrun/Slurm every rank calls this: all ranks train, rank 0 alone writes the run
    folder and evaluates; the other ranks return ``{"rank": r, "steps": n}``.
    """
    env = init_distributed(cfg.device)
    run_dir = run_dir_for(out, cfg)
    state = check_run_dir(run_dir, cfg, force)
    barrier(env)  # every rank has read the folder's state before rank 0 writes to it
    if state == "done":
        print(f"{run_dir}: finished earlier with the same config; reusing its metrics.json")
        return json.loads((run_dir / "metrics.json").read_text())
    if env.is_main:  # rank 0 builds the testbed if it must; the others then reuse it
        data = resolve_data(cfg, testbed_dir)
    barrier(env)
    if not env.is_main:
        data = resolve_data(cfg, testbed_dir)
    shards, tasks, uses_testbed, num_samples = data
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_metadata(run_dir, cfg.to_dict(), cfg.seed)
    barrier(env)

    t0 = time.perf_counter()
    ckpt = train(cfg, run_dir, shards, cfg.sidecar_dir, num_samples=num_samples, eval_tasks=tasks)
    train_s = time.perf_counter() - t0
    if not env.is_main:
        return {"rank": env.rank, "steps": cfg.steps}
    t1 = time.perf_counter()
    metrics = evaluate_checkpoint(cfg, ckpt, tasks)
    eval_s = time.perf_counter() - t1

    train_state = load_checkpoint(ckpt)
    metrics.update(
        p=cfg.p,
        label=f"p={cfg.p:g}",
        model=cfg.model,
        checkpoint=str(ckpt.relative_to(run_dir)),
        steps=train_state["step"],
        mixing=train_state["mixing"],
        train_seconds=round(train_s, 1),
        eval_seconds=round(eval_s, 1),
        device=env.device,
        world_size=env.world_size,
        torch_threads=torch.get_num_threads(),
    )
    if uses_testbed:
        metrics["notice"] = TESTBED_NOTICE
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
