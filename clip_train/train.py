"""CLIP training on caption-mixed WebDataset shards: one readable loop, one process per GPU.

Composes open_clip (model, tokenizer, ``ClipLoss``, cosine schedule, checkpoint format) with
caption_mixing (shards, sidecars, the mixing rule) and torch.distributed (``clip_train.distributed``).

Scale. ``batch_size`` is the global batch. Each of ``world_size`` ranks reads its own shards
(``wds.split_by_node``) in micro-batches of ``batch_size / (world_size * accum_freq)``. The loss is
open_clip's ``ClipLoss`` with ``local_loss`` and ``gather_with_grad``: each rank scores its rows
against all gathered columns and the gather keeps the graph, so the DDP-averaged gradient is the
gradient of the global-batch loss. ``accum_freq > 1`` uses open_clip's contrastive accumulation: the
features of all micro-batches are cached without a graph, then each micro-batch is re-run with the
others' cached features as negatives (so negatives span the whole accumulated batch).

Epoch length. With DDP every rank must run the same number of steps, but shards split unevenly.
The epoch is therefore explicit: ``steps_per_epoch = train_num_samples // batch_size`` (or the
data's known size), and each rank's pipeline is cut (and, when its shards run short, repeated)
to ``steps_per_epoch * accum_freq`` micro-batches with WebDataset's ``with_epoch``, as open_clip
does with ``--train-num-samples``. A single process with unknown data size makes one pass per epoch.

Resume. A run folder holds ``checkpoints/``, ``train_log.jsonl`` and ``tensorboard/``. Started
again on the same folder, the run resumes from its last checkpoint (model, optimizer, scaler,
step, epoch, micro-batch within the epoch, mixing counts) and ends at the same step count. The
schedule is a function of the step, so restoring the step restores it. SIGTERM, SIGUSR1 or
SIGUSR2 (the signal submitit has Slurm send before the time limit; ``$SUBMITIT_PREEMPT_SIGNAL``
names another) make the run write a checkpoint at the next step boundary and raise ``Preempted``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from caption_mixing import MixStats, SharedEpoch, build_caption_pipeline, expand_shards, make_loader
from caption_mixing.atomic import atomic_write_json
from clip_train.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from clip_train.config import ClipTrainConfig
from clip_train.distributed import DistEnv, any_flag, barrier, init_distributed, sum_counters
from clip_train.model import create_model
from clip_train.preemption import Preempted, PreemptionFlag

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


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


def resolve_device(cfg: ClipTrainConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


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


def known_num_samples(shards: str) -> int | None:
    """Sample count from metadata beside the shards: open_clip's ``sizes.json`` or img2dataset's
    ``*_stats.json`` (``successes``). None when any shard is not covered (never guessed)."""
    urls = expand_shards(shards, check_exists=False)
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file.exists():
            sizes = sizes_cache.setdefault(sizes_file, json.loads(sizes_file.read_text()))
            if path.name in sizes:
                total += int(sizes[path.name])
                continue
        stats = path.with_name(f"{path.stem}_stats.json")
        if stats.exists():
            total += int(json.loads(stats.read_text()).get("successes", 0))
            continue
        return None
    return total


def plan_epoch(
    cfg: ClipTrainConfig, env: DistEnv, shards: str, num_samples: int | None
) -> tuple[int, int | None, int | None]:
    """(per-rank micro-batch size, micro-batches per epoch per rank, batches per worker) or Nones
    for a natural one-pass epoch; refuses layouts that would give ranks unequal step counts."""
    local_bs = cfg.local_batch_size(env.world_size)
    n = cfg.train_num_samples or num_samples or known_num_samples(shards)
    if n is None:
        if env.distributed:
            raise ValueError(
                f"train_num_samples is not set and the size of {shards} is unknown; with {env.world_size} "
                "ranks every rank needs the same steps per epoch: pass --set train_num_samples=N"
            )
        return local_bs, None, None
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train_num_samples={n} is less than one global batch (batch_size={cfg.batch_size})")
    if not cfg.resampled:
        n_shards = len(expand_shards(shards, check_exists=False))
        readers = env.world_size * max(1, cfg.workers)
        if n_shards < readers:
            raise ValueError(
                f"{n_shards} shards cannot feed {env.world_size} ranks x {max(1, cfg.workers)} workers: "
                "lower --set workers, or --set resampled=true"
            )
    micro = steps_per_epoch * cfg.accum_freq
    return local_bs, micro, math.ceil(micro / max(1, cfg.workers))


def _resolve_eval_tasks(cfg: ClipTrainConfig, given: dict[str, str] | None) -> dict[str, str]:
    """The quick-eval subset of the run's eval tasks; unknown names are an error naming the key."""
    if not cfg.eval_every:
        return {}
    tasks = given
    if tasks is None:
        from clip_train.experiment import resolve_data

        tasks = resolve_data(cfg).tasks
    if not cfg.quick_eval_tasks:
        return dict(tasks)
    names = [n.strip() for n in cfg.quick_eval_tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(f"quick_eval_tasks: {unknown} not among eval_tasks ({', '.join(tasks)})")
    return {n: tasks[n] for n in names}


class RunLogger:
    """train_log.jsonl plus TensorBoard (and W&B when installed and asked for); rank 0 only."""

    def __init__(self, run_dir: Path, cfg: ClipTrainConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.file = (run_dir / "train_log.jsonl").open("a") if enabled else None
        self.tb = self.wandb = None
        kinds = {k.strip() for k in cfg.logger.split(",")}
        if enabled and "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if enabled and "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                log.warning("logger=wandb but wandb is not installed; logging to TensorBoard/jsonl only")
            else:
                self.wandb = wandb.init(
                    project="caption-mixing", name=run_dir.name, dir=str(run_dir), config=cfg.to_dict(), resume="allow"
                )

    def write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _micro_batches(loader: Any, skip: int) -> Iterator[tuple[int, dict]]:
    """(1-based index, batch) over one epoch, skipping the first ``skip`` after a resume."""
    for i, batch in enumerate(loader, start=1):
        if i > skip:
            yield i, batch


def train(
    cfg: ClipTrainConfig,
    run_dir: Path,
    shards: str,
    sidecar_dir: str | None = None,
    *,
    num_samples: int | None = None,
    eval_tasks: dict[str, str] | None = None,
) -> Path:
    """Train to ``cfg.steps`` steps (resuming if the run folder has a checkpoint); return the last checkpoint.

    ``num_samples`` is the data's size when the caller knows it (sets the epoch length unless
    ``cfg.train_num_samples`` does); ``eval_tasks`` (name -> folder) feed the periodic quick eval.
    Every rank calls this; only rank 0 writes. Raises ``Preempted`` after a preemption signal and
    ``NonFiniteLossError`` on a NaN/inf loss.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    env = init_distributed(cfg.device)
    device = env.device
    local_bs, micro_per_epoch, worker_batches = plan_epoch(cfg, env, shards, num_samples)
    quick_tasks = _resolve_eval_tasks(cfg, eval_tasks) if env.is_main else {}
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)

    model, preprocess_train, preprocess_val, tokenizer = create_model(cfg.model, device=device)
    torch.manual_seed(cfg.seed + env.rank)  # then per-rank randomness (crops, worker seeds), as open_clip does
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0]) if cfg.precision == "amp" else None
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    loss_fn = make_loss(cfg, env)

    step, epoch, batch_in_epoch, stats, base = 0, 0, 0, MixStats(), MixStats()
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        load_model_state(model, state, cfg.model, resume)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        saved_layout = (state.get("world_size", 1), state.get("accum_freq", 1), state.get("workers", cfg.workers))
        if saved_layout != (env.world_size, cfg.accum_freq, cfg.workers):
            log.warning(
                "%s was written with (world_size, accum_freq, workers)=%s, now %s: the data order after "
                "the resume differs from an uninterrupted run",
                resume,
                saved_layout,
                (env.world_size, cfg.accum_freq, cfg.workers),
            )
        if env.is_main:  # the saved counts are global totals; rank 0 carries them on
            base.used.update(state["mixing"]["used"])
            base.fallbacks.update(state["mixing"]["fallbacks"])
            print(f"resuming from {resume} at step {step} (epoch {epoch}, micro-batch {batch_in_epoch})")
    if micro_per_epoch is not None and batch_in_epoch >= micro_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0

    ddp_model: torch.nn.Module = model
    if env.distributed:
        ids = [env.local_rank] if device.startswith("cuda") else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.torch_compile:
        ddp_model = torch.compile(ddp_model)

    schedule = cfg.schedule()
    if schedule is not None and micro_per_epoch is None:
        raise ValueError(f"p_schedule={cfg.p_schedule!r} needs a known epoch length: pass --set train_num_samples=N")
    num_epochs = math.ceil(cfg.steps * cfg.accum_freq / micro_per_epoch) if micro_per_epoch else 1
    shared_epoch = SharedEpoch(epoch)
    pipeline = build_caption_pipeline(
        shards,
        mixture=cfg.mixture(),
        schedule=schedule,
        num_epochs=num_epochs,
        long_captions=cfg.long_captions,
        seed=cfg.seed,
        epoch=shared_epoch,
        image_transform=preprocess_train,
        tokenizer=tokenizer,
        batch_size=local_bs,
        shuffle_buffer=cfg.shuffle_buffer,
        sidecar_dir=sidecar_dir,
        resampled=cfg.resampled,
        batches_per_epoch=worker_batches,
    )
    loader = make_loader(pipeline, cfg.workers)

    def global_mixing() -> MixStats:
        total = MixStats(sum_counters(env, stats.used), sum_counters(env, stats.fallbacks))
        total.used.update(base.used)
        total.fallbacks.update(base.fallbacks)
        return total

    def save(mix: MixStats) -> Path | None:
        if not env.is_main:
            return None
        state = {
            "name": run_dir.name,
            "model_name": cfg.model,
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "mixing": {"used": dict(mix.used), "fallbacks": dict(mix.fallbacks)},
            "world_size": env.world_size,
            "accum_freq": cfg.accum_freq,
            "workers": cfg.workers,
            "config": cfg.to_dict(),
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return save_checkpoint(ckpt_dir, state, step, cfg.keep_last)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout = {
            "world_size": env.world_size,
            "local_batch_size": local_bs,
            "micro_batches_per_epoch": micro_per_epoch,
        }
        atomic_write_json(run_dir / "train_config.json", {**cfg.to_dict(), **layout})
    logger = RunLogger(run_dir, cfg, env.is_main)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"train p={cfg.p:g}",
        unit="step",
        dynamic_ncols=True,
        disable=not env.is_main,
    )
    last_ckpt = resume
    data_errors: Counter = Counter()
    ddp_model.train()
    t_last, steps_last = time.perf_counter(), 0
    with PreemptionFlag() as preempt:
        try:
            while step < cfg.steps:
                shared_epoch.set(epoch)
                micro: list[tuple[torch.Tensor, torch.Tensor]] = []
                i = batch_in_epoch
                for i, batch in _micro_batches(loader, batch_in_epoch):
                    micro.append(
                        (batch["images"].to(device, non_blocking=True), batch["texts"].to(device, non_blocking=True))
                    )
                    stats.update(batch["sources"], batch["wanted"])
                    data_errors.update(batch.get("data_errors", {}))
                    if len(micro) < cfg.accum_freq:
                        continue
                    lr = scheduler(step)
                    optimizer.zero_grad(set_to_none=True)
                    loss = forward_backward(ddp_model, micro, loss_fn, cfg.precision, device, scaler)
                    micro = []
                    stop, nonfinite = any_flag(env, preempt.requested, not torch.isfinite(loss).item())
                    if nonfinite:
                        raise NonFiniteLossError(
                            f"loss is {loss.item()} at step {step} (rank {env.rank}, {run_dir}); "
                            f"last good checkpoint: {last_ckpt or 'none'}"
                        )
                    optimizer_step(ddp_model, optimizer, scaler, cfg.grad_clip_norm)
                    step, batch_in_epoch, steps_last = step + 1, i, steps_last + 1
                    bar.update(1)

                    if step % cfg.log_every == 0 or step == cfg.steps:
                        mix = global_mixing()
                        now = time.perf_counter()
                        sps = steps_last * cfg.batch_size / (now - t_last)
                        t_last, steps_last = now, 0
                        scale = unwrap(ddp_model).logit_scale.exp().item()
                        realized = mix.realized()
                        record = {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss.item(),
                            "lr": lr,
                            "logit_scale": scale,
                            "samples_per_s": sps,
                            "realized_p": mix.realized_synthetic_ratio(),
                            "realized": realized,
                            "fallbacks": dict(mix.fallbacks),
                            "data_errors": dict(data_errors),
                        }
                        scalars = {
                            "train/loss": record["loss"],
                            "train/lr": lr,
                            "train/logit_scale": scale,
                            "train/samples_per_s": sps,
                            "mixing/realized_p": record["realized_p"],
                            **{f"mixing/share_{src}": v for src, v in realized.items()},
                        }
                        logger.write(record, scalars)
                        bar.set_postfix_str(
                            f"loss={record['loss']:.3f} lr={lr:.2e} scale={scale:.1f} {sps:.0f} samples/s "
                            + " ".join(f"{src}={v:.3f}" for src, v in realized.items())
                        )
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                        last_ckpt = save(global_mixing()) or last_ckpt
                    if cfg.eval_every and step % cfg.eval_every == 0 and env.is_main and quick_tasks:
                        _quick_eval(model, tokenizer, preprocess_val, quick_tasks, device, step, logger)
                        t_last, steps_last = time.perf_counter(), 0  # keep eval time out of samples/s
                    if stop:
                        barrier(env)
                        raise Preempted(step, last_ckpt, preempt.signum)
                    if step >= cfg.steps or (micro_per_epoch is not None and i >= micro_per_epoch):
                        break
                if step >= cfg.steps:
                    break
                if i == 0:
                    raise RuntimeError(
                        f"rank {env.rank}: the training data yielded no batch of {local_bs} (shards: {shards})"
                    )
                if micro_per_epoch is not None and i < micro_per_epoch:
                    raise RuntimeError(
                        f"rank {env.rank}: epoch {epoch} ended after {i} of {micro_per_epoch} micro-batches; "
                        f"its shards of {shards} yield too few samples (check train_num_samples)"
                    )
                epoch, batch_in_epoch = epoch + 1, 0
        finally:
            bar.close()
            logger.close()

    mix = global_mixing()
    if env.is_main:
        print(
            f"trained {step} steps; realized synthetic share {mix.realized_synthetic_ratio():.4f} "
            f"(p={cfg.p:g}), fallbacks to alt-text: {sum(mix.fallbacks.values())}"
        )
    if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:08d}.pt"):
        last_ckpt = save(mix) or last_ckpt
    barrier(env)
    from clip_train.checkpoint import checkpoint_path

    return checkpoint_path(ckpt_dir, step)


def _quick_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    tasks: dict[str, str],
    device: str,
    step: int,
    logger: RunLogger,
) -> None:
    """Zero-shot main metric per task, to TensorBoard and train_log.jsonl (the model returns to train mode)."""
    from eval.zeroshot import evaluate_tasks, main_metric_value

    results = evaluate_tasks(model, tokenizer, preprocess, tasks, device=device, progress=False)
    values = {name: main_metric_value(r) for name, r in results.items()}
    logger.write(
        {"step": step, "eval": values},
        {f"eval/{name}": v for name, v in values.items() if v is not None},
    )
