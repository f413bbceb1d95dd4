"""One CLIP optimizer step: the optimizer, the loss, mixed precision, accumulation and the update.

The functions here are the numerical core of ``clip_train.train``; tests call them directly to
check that 2 DDP ranks, or 2 accumulated micro-batches, give the update of one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import open_clip
import torch

from clip_train.config import ClipTrainConfig
from training.distributed import DistEnv

log = logging.getLogger(__name__)


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
    """AdamW, fused (one kernel for all parameters) on CUDA and CPU where this torch supports it."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exn:  # older torch or unsupported device
        log.info("fused AdamW unavailable on %s (%s); using the foreach implementation", device, exn)
        return torch.optim.AdamW(groups, **kwargs)


def make_autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the forward pass; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def make_loss(cfg: ClipTrainConfig, env: DistEnv) -> open_clip.ClipLoss:
    return open_clip.ClipLoss(
        local_loss=cfg.local_loss,
        gather_with_grad=cfg.gather_with_grad,
        cache_labels=True,
        rank=env.rank,
        world_size=env.world_size,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain open_clip model under DDP and/or torch.compile wrappers (its state_dict has no prefixes)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _features(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: torch.nn.Module,
    autocast_precision: str,
    device: str,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Accumulate the gradient of the contrastive loss over the global batch; return the loss (detached).

    One micro-batch: plain forward/backward. Several (open_clip's ``accum_freq``): cache all features
    without a graph, then re-run each micro-batch with the others' cached features as negatives.
    Unlike open_clip, ``logit_scale`` enters the graph in the last re-run only, so its gradient is
    that of the big-batch loss rather than ``accum_freq`` times it; gradients are synchronised
    across ranks once, on the last re-run (``no_sync`` before it).
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with make_autocast(autocast_precision, device):
            img, txt, scale = _features(model(images, texts))
            loss = loss_fn(img, txt, scale)
        backward(loss)
        return loss.detach()

    cached_img, cached_txt = [], []
    with torch.no_grad(), make_autocast(autocast_precision, device):
        for images, texts in micro_batches:
            img, txt, _ = _features(model(images, texts))
            cached_img.append(img)
            cached_txt.append(txt)
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if (j == last or not ddp) else model.no_sync()
        with sync:
            with make_autocast(autocast_precision, device):
                img, txt, scale = _features(model(images, texts))
                all_img = torch.cat(cached_img[:j] + [img] + cached_img[j + 1 :])
                all_txt = torch.cat(cached_txt[:j] + [txt] + cached_txt[j + 1 :])
                loss = loss_fn(all_img, all_txt, scale if j == last else scale.detach())
            backward(loss)
    return loss.detach()


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip_norm: float | None,
) -> None:
    """Clip (optionally), step, and clamp the logit scale to ln(100) as the CLIP paper does."""
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(100))
