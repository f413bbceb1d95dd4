"""CLIP training on caption-mixed WebDataset shards: one loop, one process per GPU.

Composes open_clip (model, tokenizer, ``ClipLoss``, cosine schedule, checkpoint format) with
caption_mixing (shards, sidecars, the mixing rule) and the shared runtime ``training`` (process
group, checkpoints, resume state, NaN guard, preemption, step log).

Scale. ``batch_size`` is the global batch. Each of ``world_size`` ranks reads its own shards
(``wds.split_by_node``) in micro-batches of ``batch_size / (world_size * accum_freq)``. The loss is
open_clip's ``ClipLoss`` with ``local_loss`` and ``gather_with_grad``: each rank scores its rows
against all gathered columns and the gather keeps the graph, so the DDP-averaged gradient is the
gradient of the global-batch loss. ``accum_freq > 1`` uses open_clip's contrastive accumulation
(``clip_train.step.forward_backward``). Epoch length is explicit so every rank runs the same
number of steps (``clip_train.data.plan_epoch``).

Resume. A run folder holds ``checkpoints/``, ``train_log.jsonl`` and ``tensorboard/``. Started
again on the same folder, the run resumes from its newest readable checkpoint (model, optimizer,
scaler, and ``training.state.TrainState``: step, epoch, micro-batch within the epoch, mixing and
data-error counts), trims the log to that step, and ends at the same step count. The schedule is
a function of the step, so restoring the step restores it. SIGTERM, SIGUSR1 or SIGUSR2 (the
signal submitit has Slurm send before the time limit; ``$SUBMITIT_PREEMPT_SIGNAL`` names another)
make the run write a checkpoint at the next step boundary and raise ``Preempted``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip_train.scheduler import cosine_lr

from caption_mixing import SharedEpoch
from caption_mixing.atomic import atomic_write_json
from clip_train.config import ClipTrainConfig
from clip_train.data import EpochPlan, build_loader, check_epoch_end, plan_epoch, to_device
from clip_train.evaluation import EvalPlan, plan_from_config, quick_eval_record, quick_plan, run_eval
from clip_train.model import create_model
from clip_train.step import forward_backward, make_loss, make_optimizer, optimizer_step, unwrap
from training.checkpoint import checkpoint_path, load_latest, load_model_state, save_checkpoint
from training.distributed import DistEnv, barrier, init_distributed
from training.guard import NonFiniteLossError, check_step
from training.preemption import Preempted, PreemptionFlag
from training.state import TrainState, mix_stats, nest_counts
from training.steplog import StepLogger

__all__ = ["NonFiniteLossError", "Preempted", "train"]

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What one rank trains with: the model and its transforms, optimizer, scaler, schedule, loss."""

    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    scheduler: Any
    loss_fn: torch.nn.Module


class Throughput:
    """Samples per second over the steps since the last report (evaluation time kept out)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def samples_per_s(self) -> float:
        rate = self.steps * self.batch_size / (time.perf_counter() - self.t0)
        self.reset()
        return rate


def train(
    cfg: ClipTrainConfig,
    run_dir: Path,
    shards: str,
    sidecar_dir: str | None = None,
    *,
    num_samples: int | None = None,
    evals: EvalPlan | None = None,
) -> Path:
    """Train to ``cfg.steps`` steps (resuming if the run folder has a checkpoint); return the last checkpoint.

    ``num_samples`` is the data's size when the caller knows it (sets the epoch length unless
    ``cfg.train_num_samples`` does); ``evals`` are the run's eval tasks, of which ``quick_eval_tasks``
    are scored every ``eval_every`` steps. Every rank calls this; only rank 0 writes. Raises
    ``Preempted`` after a preemption signal and ``NonFiniteLossError`` on a NaN/inf loss (on every rank).
    """
    run_dir = Path(run_dir)
    env = init_distributed(cfg.device)
    plan = plan_epoch(cfg, env, shards, num_samples)
    if cfg.eval_every and env.is_main:  # rank 0 alone evaluates
        quick = quick_plan(cfg, evals if evals is not None else plan_from_config(cfg))
    else:
        quick = None
    parts = build_parts(cfg, env)
    state, last_ckpt = resume(run_dir, cfg, env, parts)
    state.roll_over(plan.micro_per_epoch)
    model = wrap_model(parts.model, cfg, env)
    epoch = SharedEpoch(state.epoch)
    loader = build_loader(cfg, shards, sidecar_dir, plan, epoch, parts.preprocess_train, parts.tokenizer)
    write_train_config(run_dir, cfg, env, plan)
    logger = StepLogger(
        run_dir,
        enabled=env.is_main,
        total=cfg.steps,
        initial=state.step,
        desc=f"train p={cfg.p:g}",
        loggers=cfg.logger,
        config=cfg.to_dict(),
    )
    rate = Throughput(cfg.batch_size)
    model.train()
    with logger, PreemptionFlag() as preempt:
        while state.step < cfg.steps:
            epoch.set(state.epoch)
            micro: list[tuple[torch.Tensor, torch.Tensor]] = []
            last = state.batch_in_epoch
            for last, batch in state.epoch_batches(loader):
                micro.append(to_device(batch, env.device))
                if len(micro) < cfg.accum_freq:
                    continue
                lr = parts.scheduler(state.step)
                parts.optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(model, micro, parts.loss_fn, cfg.precision, env.device, parts.scaler)
                micro = []
                stop = check_step(env, loss, preempt.requested, state.step, last_ckpt)
                optimizer_step(model, parts.optimizer, parts.scaler, cfg.grad_clip_norm)
                state.step, state.batch_in_epoch = state.step + 1, last
                rate.steps += 1
                logger.step()

                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    scale = unwrap(model).logit_scale.exp().item()
                    logger.write(*log_record(state, loss, lr, scale, rate.samples_per_s(), state.totals(env)))
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stop:
                    last_ckpt = save(run_dir, cfg, env, parts, state, state.totals(env)) or last_ckpt
                if quick is not None and state.step % cfg.eval_every == 0:
                    suite = run_eval(quick, parts.model, parts.tokenizer, parts.preprocess_val, env.device, False)
                    logger.write(*quick_eval_record(suite, state.step))
                    rate.reset()  # keep eval time out of samples/s
                if stop:
                    barrier(env)
                    raise Preempted(state.step, last_ckpt, preempt.signum)
                if state.step >= cfg.steps or (plan.micro_per_epoch is not None and last >= plan.micro_per_epoch):
                    break
            if state.step >= cfg.steps:
                break
            check_epoch_end(env, last, plan, shards, state.epoch)
            state.next_epoch()

    totals = state.totals(env)
    final = checkpoint_path(run_dir / "checkpoints", state.step)
    if env.is_main:
        mix = mix_stats(totals)
        print(
            f"trained {state.step} steps; realized synthetic share {mix.realized_synthetic_ratio():.4f} "
            f"(p={cfg.p:g}), fallbacks to alt-text: {sum(mix.fallbacks.values())}"
        )
    if last_ckpt is None or last_ckpt.name != final.name:
        save(run_dir, cfg, env, parts, state, totals)
    barrier(env)
    return final


def build_parts(cfg: ClipTrainConfig, env: DistEnv) -> Parts:
    """The model (the same initial weights on every rank), then per-rank randomness, optimizer and loss."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model, preprocess_train, preprocess_val, tokenizer = create_model(cfg.model, device=env.device)
    torch.manual_seed(cfg.seed + env.rank)  # then per-rank randomness (crops, worker seeds), as open_clip does
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.split(":")[0]) if cfg.precision == "amp" else None
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    return Parts(model, preprocess_train, preprocess_val, tokenizer, optimizer, scaler, scheduler, make_loss(cfg, env))


def wrap_model(model: torch.nn.Module, cfg: ClipTrainConfig, env: DistEnv) -> torch.nn.Module:
    """DDP across ranks, then ``torch.compile`` if asked for; ``unwrap`` gets the open_clip model back."""
    if env.distributed:
        ids = [env.local_rank] if env.device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.torch_compile:
        model = torch.compile(model)
    return model


def resume(run_dir: Path, cfg: ClipTrainConfig, env: DistEnv, parts: Parts) -> tuple[TrainState, Path | None]:
    """Restore the newest readable checkpoint (an unreadable newer one is named and skipped), if any."""
    path, saved = load_latest(run_dir / "checkpoints")
    if path is None or saved is None:
        return TrainState(), None
    load_model_state(parts.model, saved, cfg.model, path)
    parts.optimizer.load_state_dict(saved["optimizer"])
    if parts.scaler is not None and saved.get("scaler"):
        parts.scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_checkpoint(saved, env.is_main)
    saved_layout = (saved.get("world_size", 1), saved.get("accum_freq", 1), saved.get("workers", cfg.workers))
    layout = (env.world_size, cfg.accum_freq, cfg.workers)
    if saved_layout != layout:
        log.warning(
            "%s was written with (world_size, accum_freq, workers)=%s, now %s: the data order after "
            "the resume differs from an uninterrupted run",
            path,
            saved_layout,
            layout,
        )
    if env.is_main:
        print(f"resuming from {path} at step {state.step} (epoch {state.epoch}, micro-batch {state.batch_in_epoch})")
    return state, path


def save(
    run_dir: Path, cfg: ClipTrainConfig, env: DistEnv, parts: Parts, state: TrainState, totals: Counter
) -> Path | None:
    """Rank 0 writes an open_clip-format checkpoint with the resume state and global counts."""
    if not env.is_main:
        return None
    saved = {
        "name": run_dir.name,
        "model_name": cfg.model,
        **state.to_dict(totals),
        "state_dict": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "world_size": env.world_size,
        "accum_freq": cfg.accum_freq,
        "workers": cfg.workers,
        "config": cfg.to_dict(),
    }
    if parts.scaler is not None:
        saved["scaler"] = parts.scaler.state_dict()
    return save_checkpoint(run_dir / "checkpoints", saved, state.step, cfg.keep_last)


def write_train_config(run_dir: Path, cfg: ClipTrainConfig, env: DistEnv, plan: EpochPlan) -> None:
    """``train_config.json``: the config plus the layout this process group trains with."""
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout = {
            "world_size": env.world_size,
            "local_batch_size": plan.local_batch_size,
            "micro_batches_per_epoch": plan.micro_per_epoch,
        }
        atomic_write_json(run_dir / "train_config.json", {**cfg.to_dict(), **layout})


def log_record(
    state: TrainState, loss: torch.Tensor, lr: float, scale: float, sps: float, totals: Counter
) -> tuple[dict[str, Any], dict[str, float], str]:
    """(``train_log.jsonl`` record, TensorBoard scalars, progress-bar postfix) of one logged step."""
    mix = mix_stats(totals)
    realized = mix.realized()
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss.item(),
        "lr": lr,
        "logit_scale": scale,
        "samples_per_s": sps,
        "realized_p": mix.realized_synthetic_ratio(),
        "realized": realized,
        "fallbacks": dict(mix.fallbacks),
        "data_errors": nest_counts(totals)["data_errors"],
    }
    scalars = {
        "train/loss": record["loss"],
        "train/lr": lr,
        "train/logit_scale": scale,
        "train/samples_per_s": sps,
        "mixing/realized_p": record["realized_p"],
        **{f"mixing/share_{src}": v for src, v in realized.items()},
    }
    postfix = f"loss={record['loss']:.3f} lr={lr:.2e} scale={scale:.1f} {sps:.0f} samples/s " + " ".join(
        f"{src}={v:.3f}" for src, v in realized.items()
    )
    return record, scalars, postfix
