"""Text-to-image DiT training on caption-mixed data: one readable loop (in the spirit of DiT's train.py).

accelerate handles devices, bf16 autocast, gradient accumulation and multi-GPU/multi-node
(launch with ``accelerate launch -m t2i train ...``); every rank reads its own shards through
webdataset's split_by_node, and the caption of a sample depends on (seed, epoch, key) only.
A run folder holds ``checkpoints/``, ``train_log.jsonl`` and, at the end, ``pipeline/`` (a diffusers
PixArtAlphaPipeline folder with the EMA weights). Started again on the same folder, training
resumes from the last checkpoint at the same data position and ends at the same step count; a
stop signal (Slurm's pre-timeout USR2, TERM) writes a checkpoint at that step and raises ``Preempted``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_text
from caption_mixing.mixing import MixStats, Mixture, unit_hash
from caption_mixing.pipeline import SharedEpoch, make_loader
from caption_mixing.shards import expand_shards
from clip_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from clip_train.distributed import DistEnv, any_flag, sum_counters
from clip_train.preemption import Preempted, PreemptionFlag
from t2i.components import TextEncoder, load_text_encoder, load_vae
from t2i.config import T2IConfig
from t2i.data import build_t2i_pipeline
from t2i.model import build_transformer, train_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class DataSpec:
    """Where training data comes from, resolved from the config (see experiment.resolve_data)."""

    shards: str | list[str]
    latents: bool
    sidecar_dir: str | None
    dataset_size: int | None


def resolve_device(cfg: T2IConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def cpu_threads(cfg: T2IConfig) -> Iterator[int]:
    """On CPU, leave one core per DataLoader worker: intra-op threads + workers <= cores.

    torch defaults to one thread per core; with loader workers beside them, OpenMP threads wait on
    each other (measured on 2 cores with 1 worker: clip_train steps 4x slower with 2 threads than
    with 1). An explicit OMP_NUM_THREADS is respected.
    """
    old = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = max(1, cores - cfg.workers)
    limit = resolve_device(cfg) == "cpu" and "OMP_NUM_THREADS" not in os.environ and want < old
    if limit:
        torch.set_num_threads(want)
    try:
        yield torch.get_num_threads()
    finally:
        if limit:
            torch.set_num_threads(old)


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(self.shadow)
        return model


def micro_batches_per_epoch(cfg: T2IConfig, data: DataSpec, world: int) -> int | None:
    """Micro-batches every rank takes per epoch when several processes train; None for one process
    (natural epochs: one pass over the shards).

    DDP needs the same number of steps on every rank, so with ``world`` > 1 the epoch length comes
    from the dataset size (as open_clip's ``train_num_samples``) and every rank and worker needs a shard.
    """
    if world == 1:
        return None
    n = cfg.dataset_size or data.dataset_size
    if not n:
        raise ValueError(
            f"dataset_size is not set and the size of {data.shards} is unknown; with {world} processes every "
            "rank needs the same steps per epoch: pass --set dataset_size=N"
        )
    if n < cfg.batch_size:
        raise ValueError(f"dataset_size={n} is less than one global batch (batch_size={cfg.batch_size})")
    readers = world * max(1, cfg.workers)
    n_shards = len(expand_shards(data.shards, check_exists=False))
    if n_shards < readers:
        raise ValueError(
            f"{n_shards} shards cannot feed {world} processes x {max(1, cfg.workers)} workers: "
            "lower --set workers, or split the data into more shards"
        )
    return n // cfg.batch_size * cfg.grad_accum


def warmup_constant(step: int, warmup: int) -> float:
    """PixArt/DiT schedule: linear warm-up, then constant."""
    return min(1.0, (step + 1) / max(1, warmup))


def vlb_loss(
    sched, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor
) -> torch.Tensor:
    """DiT/improved-DDPM variational bound for the learned-sigma half (eps is detached), in bits per dim."""
    ac = sched.alphas_cumprod.to(x0.device)
    betas = sched.betas.to(x0.device)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(a: torch.Tensor) -> torch.Tensor:
        return a[t].view(-1, 1, 1, 1)

    coef1 = at(betas * ac_prev.sqrt() / (1 - ac))
    coef2 = at((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
    true_mean = coef1 * x0 + coef2 * xt
    true_logvar = at(post_logvar)
    frac = (var_values + 1) / 2
    model_logvar = frac * at(torch.log(betas)) + (1 - frac) * true_logvar
    pred_x0 = (xt - at((1 - ac).sqrt()) * eps) / at(ac.sqrt())
    pred_mean = coef1 * pred_x0 + coef2 * xt
    kl = 0.5 * (
        -1.0
        + model_logvar
        - true_logvar
        + torch.exp(true_logvar - model_logvar)
        + (true_mean - pred_mean) ** 2 * torch.exp(-model_logvar)
    )
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    # t == 0: Gaussian decoder NLL (latents are continuous, so no discretisation).
    nll = 0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - pred_mean) ** 2 * torch.exp(-model_logvar))
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl).mean()


def encode_batch(batch: dict, vae, cfg: T2IConfig, latents: bool, gen: torch.Generator, device: str) -> torch.Tensor:
    """Scaled VAE latents: sampled from precomputed moments, or encoded from images on the fly."""
    x = batch["x"].to(device, non_blocking=True)
    if latents:
        mean, logvar = x.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * torch.randn(mean.shape, generator=gen, device=device)
    else:
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=gen).float()
    return z * vae.config.scaling_factor


def dropped_captions(batch: dict, cfg: T2IConfig, epoch: int) -> list[str]:
    """Replace ``caption_dropout`` of captions by the empty prompt (deterministic per seed, epoch, key)."""
    return [
        "" if unit_hash(cfg.seed, epoch, f"cfg-drop/{key}") < cfg.caption_dropout else cap
        for cap, key in zip(batch["captions"], batch["keys"], strict=True)
    ]


def drop_log_after(log_path: Path, step: int) -> None:
    """Keep only log records up to ``step`` (those after the resumed checkpoint are about to be redone)."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(kept))


def train(
    cfg: T2IConfig, run_dir: Path, data: DataSpec, vae_path: str, text_path: str, text_model: str | None = None
) -> Path:
    """Train to the configured step count (resuming if the run folder has a checkpoint); return the last checkpoint."""
    with cpu_threads(cfg):
        return _train(cfg, run_dir, data, vae_path, text_path, text_model)


def _train(
    cfg: T2IConfig, run_dir: Path, data: DataSpec, vae_path: str, text_path: str, text_model: str | None
) -> Path:
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg)
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device == "cpu",
    )
    device = str(accelerator.device)
    world = accelerator.num_processes
    micro_batch = cfg.batch_size // (world * cfg.grad_accum)
    if micro_batch < 1 or micro_batch * world * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by {world} processes x grad_accum={cfg.grad_accum}"
        )
    steps = cfg.steps_for(data.dataset_size)
    micro_per_epoch = micro_batches_per_epoch(cfg, data, world)
    torch.manual_seed(cfg.seed)

    vae = load_vae(vae_path, device)
    text: TextEncoder = load_text_encoder(text_path, cfg.max_sequence_length, device, text_model)
    model = build_transformer(cfg, text.width).to(device)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, cfg.warmup_steps))
    noise_sched = train_scheduler(cfg)
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)

    step, epoch, batch_in_epoch, stats, truncated = 0, 0, 0, MixStats(), 0
    data_errors: dict[str, int] = {}
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        model.load_state_dict(state["state_dict"])
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if accelerator.is_main_process:  # the saved counts are totals over ranks; rank 0 carries them on
            stats.used.update(state["mixing"]["used"])
            stats.fallbacks.update(state["mixing"]["fallbacks"])
            truncated, data_errors = state["truncated_prompts"], dict(state["data_errors"])
            print(f"resuming from {resume} at step {step}")
            drop_log_after(run_dir / "train_log.jsonl", step)
    if micro_per_epoch is not None and batch_in_epoch >= micro_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    model, optimizer = accelerator.prepare(model, optimizer)

    shared_epoch = SharedEpoch(epoch)
    pipeline = build_t2i_pipeline(
        data.shards,
        latents=data.latents,
        mixture=Mixture.from_p(cfg.p, cfg.synthetic_source),
        seed=cfg.seed,
        epoch=shared_epoch,
        batch_size=micro_batch,
        resolution=cfg.resolution,
        latent_shape=(2 * cfg.latent_channels, cfg.latent_size, cfg.latent_size),
        shuffle_buffer=cfg.shuffle_buffer,
        sidecar_dir=data.sidecar_dir,
    )
    if micro_per_epoch is not None:  # each worker repeats its shards if it must, so no rank runs short
        pipeline = pipeline.with_epoch(nbatches=math.ceil(micro_per_epoch / max(1, cfg.workers)))
    loader = make_loader(pipeline, cfg.workers)

    env = DistEnv(accelerator.process_index, world, accelerator.local_process_index, device)

    def counts() -> dict:
        """Mixing, truncation and data-error counts summed over ranks (a collective: every rank calls it)."""
        flat = {f"used/{k}": v for k, v in stats.used.items()}
        flat.update({f"fallbacks/{k}": v for k, v in stats.fallbacks.items()})
        flat.update({f"data_errors/{k}": v for k, v in data_errors.items()})
        flat["truncated_prompts"] = truncated + text.truncated
        total = sum_counters(env, flat)
        out: dict = {"mixing": {"used": {}, "fallbacks": {}}, "data_errors": {}}
        for k, v in total.items():
            group, _, name = k.partition("/")
            if group in ("used", "fallbacks"):
                out["mixing"][group][name] = v
            elif group == "data_errors":
                out["data_errors"][name] = v
        out["truncated_prompts"] = total["truncated_prompts"]
        return out

    def state_dict(totals: dict) -> dict:
        return {
            "name": run_dir.name,
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "state_dict": accelerator.unwrap_model(model).state_dict(),
            "ema": ema.shadow,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            **totals,
            "world_size": world,
            "config": cfg.to_dict(),
        }

    last_ckpt = resume
    log_file = (run_dir / "train_log.jsonl").open("a") if accelerator.is_main_process else None
    bar = tqdm(
        total=steps,
        initial=step,
        desc=f"t2i p={cfg.p:g}",
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )
    model.train()
    t_last, n_last, micro = time.perf_counter(), 0, 0
    bad_loss, stop = False, False
    with PreemptionFlag() as preempt:
        while step < steps:
            shared_epoch.set(epoch)
            got_batch = False
            for i, batch in enumerate(loader):
                if micro_per_epoch is not None and i >= micro_per_epoch:
                    break
                if i < batch_in_epoch:  # fast-forward to the saved data position after a resume
                    continue
                got_batch = True
                # Noise, timesteps and latent samples depend on (seed, step, global micro-batch index): a resume
                # repeats them, and N ranks draw what one process accumulating N micro-batches would.
                micro_index = micro * world + accelerator.process_index
                gen = torch.Generator(device).manual_seed(hash((cfg.seed, step, micro_index)) % 2**63)
                with accelerator.autocast():  # frozen VAE and text encoder in bf16 under bf16 training, as in diffusers
                    latents = encode_batch(batch, vae, cfg, data.latents, gen, device)
                    hidden, mask = text.encode(dropped_captions(batch, cfg, epoch), device)
                noise = torch.randn(latents.shape, generator=gen, device=device)
                t = torch.randint(0, cfg.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = model(noisy, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample
                    out = out.float()
                    eps = out[:, : cfg.latent_channels]
                    loss = F.mse_loss(eps, noise)
                    if cfg.learned_sigma:
                        loss = loss + vlb_loss(
                            noise_sched, latents, noisy, t, eps.detach(), out[:, cfg.latent_channels :]
                        )
                    bad_loss = bad_loss or not torch.isfinite(loss).item()
                    if accelerator.sync_gradients:  # one collective per step: every rank takes the same branch
                        stop, bad_loss = any_flag(env, preempt.requested, bad_loss)
                        if bad_loss:
                            raise NonFiniteLossError(
                                f"non-finite loss at step {step} (this rank's loss: {loss.item()}); "
                                f"last good checkpoint: {last_ckpt or 'none'}"
                            )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    lr_sched.step() if accelerator.sync_gradients else None
                    optimizer.zero_grad(set_to_none=True)
                stats.update(batch["sources"], batch["wanted"])
                for k, v in batch["data_errors"].items():
                    data_errors[k] = data_errors.get(k, 0) + v
                batch_in_epoch = i + 1
                n_last += latents.shape[0] * world
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                micro = 0
                ema.update(accelerator.unwrap_model(model))
                step += 1
                bar.update(1)

                if accelerator.is_main_process and (step % cfg.log_every == 0 or step == steps):
                    now = time.perf_counter()
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss.item(),
                        "lr": lr_sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if cfg.grad_clip > 0 else None,
                        "images_per_s": n_last / (now - t_last),
                        "realized_p": stats.realized_synthetic_ratio(),
                        "fallbacks": dict(stats.fallbacks),
                        "truncated_prompts": truncated + text.truncated,
                        "data_errors": data_errors,
                    }
                    t_last, n_last = now, 0
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        ips=f"{record['images_per_s']:.1f}",
                        p_real=f"{record['realized_p']:.3f}",
                    )
                if step % cfg.checkpoint_every == 0 or step == steps or stop:
                    totals = counts()
                    if accelerator.is_main_process:
                        last_ckpt = save_checkpoint(ckpt_dir, state_dict(totals), step, cfg.keep_last)
                if stop:
                    accelerator.wait_for_everyone()
                    raise Preempted(step, last_ckpt, preempt.signum)
                if step >= steps:
                    break
            if step < steps:
                if not got_batch and batch_in_epoch == 0:
                    raise RuntimeError(f"the training data yielded no batch of {micro_batch} (shards: {data.shards})")
                epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if log_file is not None:
        log_file.close()
    accelerator.wait_for_everyone()
    totals = counts()
    mix = MixStats(Counter(totals["mixing"]["used"]), Counter(totals["mixing"]["fallbacks"])).as_dict()
    if accelerator.is_main_process:
        print(
            f"trained {step} steps; realized synthetic share {mix['realized_synthetic_ratio']:.4f} (p={cfg.p:g}), "
            f"fallbacks to alt-text: {sum(mix['fallbacks'].values())}, "
            f"truncated prompts: {totals['truncated_prompts']}"
        )
        if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:08d}.pt"):
            last_ckpt = save_checkpoint(ckpt_dir, state_dict(totals), step, cfg.keep_last)
    return last_ckpt


def ema_transformer(cfg: T2IConfig, ckpt: Path, caption_channels: int) -> torch.nn.Module:
    """The EMA weights of a checkpoint in a fresh transformer (what gets exported and sampled)."""
    state = load_checkpoint(ckpt)
    model = build_transformer(cfg, caption_channels)
    model.load_state_dict(state["ema"])
    return copy.deepcopy(model).eval()
