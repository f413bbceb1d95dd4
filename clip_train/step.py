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


class BothCaptionsLoss(torch.nn.Module):
    """``text_mode: both``: the text features are the B alt-texts then the B synthetic captions of the
    B images (``clip_train.data.to_device``); ``w`` (the config's p) weights the synthetic side.

    - ``both_mean``: (1 - w) * ClipLoss(images, alt) + w * ClipLoss(images, synthetic).
    - ``multi_positive``: one softmax over all 2N texts of the global batch (N images over all ranks);
      image i's targets are its alt-text (weight 1 - w) and its synthetic caption (weight w):
      L_img = -mean_i[(1 - w) log P(alt_i | i) + w log P(syn_i | i)];
      each text's positive is its image among all N: L_txt = (1 - w) CE(alt -> images) + w CE(syn -> images);
      loss = (L_img + L_txt) / 2. Texts and images are gathered from every rank as ClipLoss does
      (``local_loss``: this rank's rows against all columns; ``gather_with_grad`` as configured).
    """

    def __init__(self, w: float, kind: str, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int):
        super().__init__()
        self.w, self.kind = float(w), kind
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size
        self.clip = open_clip.ClipLoss(local_loss, gather_with_grad, False, rank, world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        b = image_features.shape[0]
        if text_features.shape[0] != 2 * b:
            raise ValueError(
                f"text_mode=both: expected 2 x {b} texts (alt then synthetic), got {text_features.shape[0]}"
            )
        alt, syn = text_features[:b], text_features[b:]
        if self.kind == "both_mean":
            return (1 - self.w) * self.clip(image_features, alt, logit_scale) + self.w * self.clip(
                image_features, syn, logit_scale
            )
        return self._multi_positive(image_features, alt, syn, logit_scale)

    def _multi_positive(self, img: torch.Tensor, alt: torch.Tensor, syn: torch.Tensor, scale: torch.Tensor):
        from open_clip.loss import gather_features

        all_img, all_alt, all_syn = img, alt, syn
        if self.world_size > 1:
            args = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
            all_img, all_alt = gather_features(img, alt, rank=self.rank, world_size=self.world_size, **args)
            all_syn = gather_features(syn, syn, rank=self.rank, world_size=self.world_size, **args)[0]
        local = self.world_size == 1 or self.local_loss
        q_img, q_alt, q_syn = (img, alt, syn) if local else (all_img, all_alt, all_syn)
        n = all_img.shape[0]
        idx = torch.arange(q_img.shape[0], device=img.device) + (
            self.rank * img.shape[0] if local and self.world_size > 1 else 0
        )
        logp = torch.log_softmax(scale * q_img @ torch.cat([all_alt, all_syn]).T, dim=1)
        rows = torch.arange(q_img.shape[0], device=img.device)
        loss_img = -((1 - self.w) * logp[rows, idx] + self.w * logp[rows, n + idx]).mean()
        ce = torch.nn.functional.cross_entropy
        loss_txt = (1 - self.w) * ce(scale * q_alt @ all_img.T, idx) + self.w * ce(scale * q_syn @ all_img.T, idx)
        return (loss_img + loss_txt) / 2


def make_loss(cfg: ClipTrainConfig, env: DistEnv) -> torch.nn.Module:
    """open_clip's ClipLoss, or ``BothCaptionsLoss`` for ``text_mode: both`` (weight p on the synthetic side)."""
    if cfg.text_mode == "both":
        return BothCaptionsLoss(cfg.p, cfg.both_loss, cfg.local_loss, cfg.gather_with_grad, env.rank, env.world_size)
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
