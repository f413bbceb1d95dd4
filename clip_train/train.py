"""CLIP training on caption-mixed WebDataset shards: one readable loop.

Composes open_clip (model, tokenizer, ClipLoss, scheduler, checkpoint format) with
caption_mixing (shards, sidecars, the mixing rule). A run folder holds ``checkpoints/`` and
``train_log.jsonl``; started again on the same folder, it resumes from its last checkpoint at
the same data position (epoch and batch within it) and ends at the same step count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import open_clip
import torch
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from caption_mixing import MixStats, Mixture, SharedEpoch, build_caption_pipeline, make_loader
from clip_train.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from clip_train.config import ClipTrainConfig
from clip_train.model import create_model

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings' scales and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, cfg: ClipTrainConfig, device: str) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.startswith("cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def resolve_device(cfg: ClipTrainConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def train(cfg: ClipTrainConfig, run_dir: Path, shards: str, sidecar_dir: str | None = None) -> Path:
    """Train to ``cfg.steps`` steps (resuming if the run folder has a checkpoint); return the last checkpoint."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)

    model, preprocess_train, _, tokenizer = create_model(cfg.model, device=device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    loss_fn = open_clip.ClipLoss()
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.precision == "amp_bf16")

    step, epoch, batch_in_epoch, stats = 0, 0, 0, MixStats()
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        load_model_state(model, state, cfg.model, resume)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        stats.used.update(state["mixing"]["used"])
        stats.fallbacks.update(state["mixing"]["fallbacks"])
        log.info("resuming from %s at step %d (epoch %d, batch %d)", resume, step, epoch, batch_in_epoch)
        print(f"resuming from {resume} at step {step}")

    mixture = Mixture.from_p(cfg.p, cfg.synthetic_source)
    shared_epoch = SharedEpoch(epoch)
    pipeline = build_caption_pipeline(
        shards,
        mixture=mixture,
        seed=cfg.seed,
        epoch=shared_epoch,
        image_transform=preprocess_train,
        tokenizer=tokenizer,
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        sidecar_dir=sidecar_dir,
    )
    loader = make_loader(pipeline, cfg.workers)

    def state_dict() -> dict:
        return {
            "name": run_dir.name,
            "model_name": cfg.model,
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "mixing": {"used": dict(stats.used), "fallbacks": dict(stats.fallbacks)},
            "config": cfg.to_dict(),
        }

    last_ckpt = resume
    log_file = (run_dir / "train_log.jsonl").open("a")
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train p={cfg.p:g}", unit="step", dynamic_ncols=True)
    model.train()
    t_last, n_last = time.perf_counter(), 0
    while step < cfg.steps:
        shared_epoch.set(epoch)
        got_batch = False
        for i, batch in enumerate(loader):
            if i < batch_in_epoch:  # fast-forward to the saved data position after a resume
                continue
            got_batch = True
            lr = scheduler(step)
            images = batch["images"].to(device, non_blocking=True)
            texts = batch["texts"].to(device, non_blocking=True)
            with autocast:
                image_features, text_features, logit_scale = model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step}; last good checkpoint: {last_ckpt or 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            stats.update(batch["sources"], batch["wanted"])
            step += 1
            batch_in_epoch = i + 1
            n_last += images.shape[0]
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss.item(),
                    "lr": lr,
                    "logit_scale": model.logit_scale.exp().item(),
                    "samples_per_s": n_last / (now - t_last),
                    "realized_p": stats.realized_synthetic_ratio(),
                    "fallbacks": dict(stats.fallbacks),
                }
                t_last, n_last = now, 0
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lr=f"{lr:.2e}",
                    scale=f"{record['logit_scale']:.1f}",
                    sps=f"{record['samples_per_s']:.0f}",
                    p_real=f"{record['realized_p']:.3f}",
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                last_ckpt = save_checkpoint(ckpt_dir, state_dict(), step, cfg.keep_last)
            if step >= cfg.steps:
                break
        if step < cfg.steps:
            if not got_batch and batch_in_epoch == 0:
                raise RuntimeError(f"the training data yielded no batch of {cfg.batch_size} (shards: {shards})")
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    log_file.close()
    mix = stats.as_dict()
    print(
        f"trained {step} steps; realized synthetic share {mix['realized_synthetic_ratio']:.4f} "
        f"(p={cfg.p:g}), fallbacks to alt-text: {sum(mix['fallbacks'].values())}"
    )
    if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:08d}.pt"):
        last_ckpt = save_checkpoint(ckpt_dir, state_dict(), step, cfg.keep_last)
    return last_ckpt
