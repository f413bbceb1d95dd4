"""Text-to-image DiT training on caption-mixed data: one loop you can read top to bottom, as DiT's train.py.

The shared runtime (``training``) supplies the process group (torchrun, srun and ``accelerate
launch`` export the same variables), checkpoints, the resume state, the NaN/stop guard and the step
log; accelerate supplies bf16 autocast, gradient accumulation and the DDP wrapper. Every rank reads
its own shards through webdataset's split_by_node, and the caption of a sample depends on
(seed, epoch, key) only (and the visit, when a worker repeats its shards to fill an epoch). A run
folder holds ``checkpoints/``, ``train_log.jsonl``, ``tensorboard/`` and, after export,
``pipeline/`` (a diffusers PixArtAlphaPipeline folder with the EMA weights).
Started again on the same folder, training resumes from the newest readable checkpoint at the same
data position and ends at the same step count; a stop signal (Slurm's pre-timeout USR2, TERM)
writes a checkpoint at that step and raises ``Preempted``.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from caption_mixing.mixconfig import mixing_plan
from caption_mixing.mixing import unit_hash
from caption_mixing.pipeline import SharedEpoch, make_loader
from caption_mixing.shards import expand_shards
from t2i.components import load_text_encoder, load_vae, token_counter
from t2i.config import T2IConfig
from t2i.data import CaptionFit, build_t2i_pipeline
from t2i.model import build_transformer, train_scheduler
from training.checkpoint import checkpoint_path, load_checkpoint, load_latest, save_checkpoint
from training.device import cpu_threads
from training.distributed import DistEnv, init_distributed
from training.guard import NonFiniteLossError, check_step
from training.preemption import Preempted, PreemptionFlag
from training.state import TrainState, mix_stats, nest_counts
from training.steplog import StepLogger

__all__ = ["DataSpec", "NonFiniteLossError", "Preempted", "ema_transformer", "train"]


@dataclass
class DataSpec:
    """Where training data comes from, resolved from the config (see experiment.resolve)."""

    shards: str | list[str]
    latents: bool
    sidecar_dir: str | None
    dataset_size: int | None


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


@dataclass
class Learner:
    """What an optimizer step changes and a checkpoint saves: the DiT, its EMA, AdamW, the warm-up."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def build(cls, cfg: T2IConfig, caption_channels: int, device: str) -> Learner:
        model = build_transformer(cfg, caption_channels).to(device)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, cfg.warmup_steps))
        return cls(model, ema, optimizer, lr_sched)

    def load(self, saved: dict) -> None:
        self.model.load_state_dict(saved["state_dict"])
        self.ema.shadow = {k: v.float() for k, v in saved["ema"].items()}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_sched.load_state_dict(saved["lr_scheduler"])

    def state_dict(self, accelerator: Accelerator) -> dict:
        return {
            "state_dict": accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict(),
            "ema": self.ema.shadow,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
        }


def make_accelerator(cfg: T2IConfig, env: DistEnv) -> Accelerator:
    """bf16 autocast, gradient accumulation and DDP; under torchrun/srun/accelerate launch it uses the
    process group ``init_distributed`` joined (accelerate does not initialize a second one).

    accelerate keeps its mixed-precision setting process-wide; it is reset first so points of a sweep
    run in one process (an fp32 point, then a bf16 one) each get their own.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=env.device == "cpu",
    )


def micro_batch_size(cfg: T2IConfig, world: int) -> int:
    """Samples per rank and micro-batch: the global batch split over ranks and accumulation steps."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if micro < 1 or micro * world * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by {world} processes x grad_accum={cfg.grad_accum}"
        )
    return micro


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


def run_epochs(cfg: T2IConfig, data: DataSpec, steps: int, micro_per_epoch: int | None) -> int:
    """Epochs the run spans: ``p_schedule`` progress is epoch / run_epochs."""
    if micro_per_epoch:
        return math.ceil(steps * cfg.grad_accum / micro_per_epoch)
    n = cfg.dataset_size or data.dataset_size
    if n:
        return max(1, math.ceil(steps * cfg.batch_size / n))
    if cfg.p_schedule is not None:
        raise ValueError(f"p_schedule={cfg.p_schedule!r} needs the epoch length: pass --set dataset_size=N")
    return 1


def training_loader(
    cfg: T2IConfig,
    data: DataSpec,
    epoch: SharedEpoch,
    micro_batch: int,
    num_epochs: int,
    micro_per_epoch: int | None,
    tokenizer,
) -> torch.utils.data.DataLoader:
    """This rank's caption-mixed micro-batches, with every mixing option of the config (``mixing_plan``);
    ``tokenizer`` (the text encoder's) measures captions for the ``long_captions`` policy."""
    plan = mixing_plan(cfg)
    fit = CaptionFit(plan.long_captions, token_counter(tokenizer), cfg.max_sequence_length, cfg.seed)
    pipeline = build_t2i_pipeline(
        data.shards,
        latents=data.latents,
        mixture=plan.mixture,
        seed=cfg.seed,
        epoch=epoch,
        batch_size=micro_batch,
        resolution=cfg.resolution,
        latent_shape=(2 * cfg.latent_channels, cfg.latent_size, cfg.latent_size),
        shuffle_buffer=cfg.shuffle_buffer,
        sidecar_dir=data.sidecar_dir,
        schedule=plan.schedule,
        num_epochs=num_epochs,
        fit=fit,
        blank_alt=plan.blank_alt,
        p_mode=plan.p_mode,
        gate=plan.gate,
        # each worker repeats its shards if it must, so no rank runs short
        batches_per_epoch=math.ceil(micro_per_epoch / max(1, cfg.workers)) if micro_per_epoch else None,
    )
    return make_loader(pipeline, cfg.workers)


def warmup_constant(step: int, warmup: int) -> float:
    """PixArt/DiT schedule: linear warm-up, then constant."""
    return min(1.0, (step + 1) / max(1, warmup))


def vlb_loss(
    sched, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor
) -> torch.Tensor:
    """DiT/improved-DDPM variational bound for the learned-sigma half (eps is detached), in bits per dim.

    The schedule's tables are computed in float64 from the betas, as DiT does in numpy: in float32,
    1 - alpha_bar_t at small t loses ~1e-4 of its value to cancellation.
    """
    betas = sched.betas.double().cpu()
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(a: torch.Tensor) -> torch.Tensor:
        return a.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)

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
    """Replace ``caption_dropout`` of captions by the empty prompt, deterministic per (seed, epoch, key) and
    drawn again on a repeated visit in the epoch (``batch["draws"]``, as the caption choice)."""
    draws = batch.get("draws", batch["keys"])
    return [
        "" if unit_hash(cfg.seed, epoch, f"cfg-drop/{draw}") < cfg.caption_dropout else cap
        for cap, draw in zip(batch["captions"], draws, strict=True)
    ]


def sample_timesteps(cfg: T2IConfig, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` training timesteps: uniform (DiT) at ``timestep_power`` 1, else with density proportional to
    t^(k-1), so that k > 1 trains the noisy steps, where the layout is decided, more often."""
    steps = cfg.num_train_timesteps
    if cfg.timestep_power == 1:
        return torch.randint(0, steps, (n,), generator=gen, device=device)
    u = torch.rand(n, generator=gen, device=device)
    return (steps * u.pow(1 / cfg.timestep_power)).long().clamp(max=steps - 1)


def diffusion_loss(
    model: torch.nn.Module,
    accelerator: Accelerator,
    cfg: T2IConfig,
    sched,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Noise the latents at random timesteps; MSE against epsilon, v or x0 (``prediction_type``; min-SNR-gamma
    weighted when ``snr_gamma`` is set), plus the VLB term when sigma is learned."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    t = sample_timesteps(cfg, latents.shape[0], gen, latents.device)
    a = sched.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with accelerator.autocast():
        out = model(noisy, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample
    out = out.float()
    pred = out[:, : cfg.latent_channels]  # epsilon, v or x0; the rest is the learned sigma (epsilon only)
    if cfg.prediction_type == "epsilon":
        target = noise
    elif cfg.prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:  # "sample": x0
        target = latents
    if cfg.snr_gamma:  # as diffusers' train_text_to_image: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v), / 1 (x0)
        snr = (a / (1 - a)).view(-1).clamp_min(1e-12)
        weight = snr.clamp(max=cfg.snr_gamma)
        if cfg.prediction_type != "sample":
            weight = weight / (snr if cfg.prediction_type == "epsilon" else snr + 1)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
    else:
        loss = F.mse_loss(pred, target)
    if cfg.learned_sigma:
        loss = loss + vlb_loss(sched, latents, noisy, t, pred.detach(), out[:, cfg.latent_channels :])
    return loss


def restore(ckpt_dir: Path, env: DistEnv, learner: Learner) -> tuple[TrainState, Path | None]:
    """Weights, optimizer and data position from the newest readable checkpoint (a fresh state without one)."""
    path, saved = load_latest(ckpt_dir)
    if saved is None:
        return TrainState(), None
    learner.load(saved)
    if env.is_main:
        print(f"resuming from {path} at step {saved['step']}")
    return TrainState.from_checkpoint(saved, env.is_main), path


def save(cfg: T2IConfig, run_dir: Path, state: TrainState, totals, learner: Learner, accelerator, world: int) -> Path:
    """Rank 0: the learner, the data position and the global counts, as ``checkpoints/step_<8-digit step>.pt``."""
    doc = {"name": run_dir.name, **state.to_dict(totals), **learner.state_dict(accelerator)}
    doc.update(world_size=world, config=cfg.to_dict())
    return save_checkpoint(run_dir / "checkpoints", doc, state.step, cfg.keep_last)


def report_counts(cfg: T2IConfig, steps: int, totals) -> None:
    """The end-of-training line: realized synthetic share, fallbacks and truncated prompts over all ranks."""
    mix = mix_stats(totals).as_dict()
    print(
        f"trained {steps} steps; realized synthetic share {mix['realized_synthetic_ratio']:.4f} (p={cfg.p:g}), "
        f"fallbacks to alt-text: {sum(mix['fallbacks'].values())}, truncated prompts: {totals['truncated_prompts']}"
    )


def log_step(logger: StepLogger, state: TrainState, loss: torch.Tensor, lr: float, grad_norm, ips: float) -> None:
    """One ``train_log.jsonl`` record; the counts are rank 0's (since the run began), no collective."""
    seen = state.local + state.base
    counts = nest_counts(seen)
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss.item(),
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "images_per_s": ips,
        "realized_p": mix_stats(seen).realized_synthetic_ratio(),
        "fallbacks": counts["mixing"]["fallbacks"],
        "truncated_prompts": seen["truncated_prompts"],
        "data_errors": counts["data_errors"],
    }
    scalars = {f"train/{k}": record[k] for k in ("loss", "lr", "images_per_s", "realized_p")}
    postfix = f"loss={record['loss']:.4f} lr={lr:.2e} ips={ips:.1f} p_real={record['realized_p']:.3f}"
    logger.write(record, scalars, postfix)


def train(
    cfg: T2IConfig, run_dir: Path, data: DataSpec, vae_path: str, text_path: str, text_model: str | None = None
) -> Path:
    """Train to the configured step count (resuming if the run folder has a checkpoint); return the last checkpoint.

    Every rank calls this; rank 0 alone writes. Raises ``Preempted`` after a stop signal and
    ``NonFiniteLossError`` (naming the last good checkpoint) when a loss is NaN/inf on any rank.
    """
    env = init_distributed(cfg.device)
    run_dir, ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
    with ExitStack() as stack:
        stack.enter_context(cpu_threads(env.device, cfg.workers))
        preempt = stack.enter_context(PreemptionFlag())
        accelerator = make_accelerator(cfg, env)
        micro_batch = micro_batch_size(cfg, env.world_size)
        steps = cfg.steps_for(data.dataset_size)
        micro_per_epoch = micro_batches_per_epoch(cfg, data, env.world_size)
        torch.manual_seed(cfg.seed)
        vae = load_vae(vae_path, env.device, cfg.allow_pickle_weights)
        text = load_text_encoder(text_path, cfg.max_sequence_length, env.device, text_model, cfg.allow_pickle_weights)
        learner = Learner.build(cfg, text.width, env.device)
        noise_sched = train_scheduler(cfg)
        state, last_ckpt = restore(ckpt_dir, env, learner)
        state.roll_over(micro_per_epoch)
        model, optimizer = learner.model, learner.optimizer = accelerator.prepare(learner.model, learner.optimizer)
        if cfg.torch_compile:  # accelerator.unwrap_model (checkpoints, EMA) sees through the compiled wrapper
            model = learner.model = torch.compile(model)
        epoch = SharedEpoch(state.epoch)
        num_epochs = run_epochs(cfg, data, steps, micro_per_epoch)
        loader = training_loader(cfg, data, epoch, micro_batch, num_epochs, micro_per_epoch, text.tokenizer)
        desc, main = f"t2i p={cfg.p:g}", env.is_main  # StepLogger trims train_log.jsonl to the resumed step
        logger = StepLogger(run_dir, enabled=main, total=steps, initial=state.step, desc=desc, loggers=cfg.logger)
        stack.enter_context(logger)
        model.train()
        t_last, n_last, micro, stop = time.perf_counter(), 0, 0, False
        while state.step < steps:
            epoch.set(state.epoch)
            for i, batch in state.epoch_batches(loader, micro_per_epoch):
                # Noise, timesteps and latent samples depend on (seed, step, global micro-batch index): a resume
                # repeats them, and N ranks draw what one process accumulating N micro-batches would.
                seed = hash((cfg.seed, state.step, micro * env.world_size + env.rank)) % 2**63
                gen = torch.Generator(env.device).manual_seed(seed)
                with accelerator.autocast():  # frozen VAE and text encoder in bf16 under bf16 training, as in diffusers
                    latents = encode_batch(batch, vae, cfg, data.latents, gen, env.device)
                    hidden, mask = text.encode(dropped_captions(batch, cfg, state.epoch), env.device)
                with accelerator.accumulate(model):
                    loss = diffusion_loss(model, accelerator, cfg, noise_sched, latents, hidden, mask, gen)
                    stop = check_step(env, loss, preempt.requested, state.step, last_ckpt)
                    accelerator.backward(loss)
                    clip = accelerator.sync_gradients and cfg.grad_clip > 0
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if clip else None
                    optimizer.step()
                    if accelerator.sync_gradients:
                        learner.lr_sched.step()
                    optimizer.zero_grad(set_to_none=True)
                state.local["truncated_prompts"] = text.truncated
                state.batch_in_epoch = i
                n_last, micro = n_last + latents.shape[0] * env.world_size, micro + 1
                if not accelerator.sync_gradients:
                    continue
                micro = 0
                learner.ema.update(accelerator.unwrap_model(model, keep_torch_compile=False))
                state.step += 1
                logger.step()
                if env.is_main and (state.step % cfg.log_every == 0 or state.step == steps):
                    now = time.perf_counter()
                    log_step(logger, state, loss, learner.lr_sched.get_last_lr()[0], grad_norm, n_last / (now - t_last))
                    t_last, n_last = now, 0
                if state.step % cfg.checkpoint_every == 0 or state.step == steps or stop:
                    totals = state.totals(env)  # a collective: every rank calls it
                    if env.is_main:
                        save(cfg, run_dir, state, totals, learner, accelerator, env.world_size)
                    last_ckpt = checkpoint_path(ckpt_dir, state.step)
                if stop:
                    accelerator.wait_for_everyone()
                    raise Preempted(state.step, last_ckpt, preempt.signum)
                if state.step >= steps:
                    break
            if state.batch_in_epoch == 0:
                raise RuntimeError(f"the training data yielded no batch of {micro_batch} (shards: {data.shards})")
            if state.step < steps:
                state.next_epoch()
        accelerator.wait_for_everyone()
        totals = state.totals(env)
        if env.is_main:
            report_counts(cfg, state.step, totals)
            if last_ckpt != checkpoint_path(ckpt_dir, state.step):
                save(cfg, run_dir, state, totals, learner, accelerator, env.world_size)
    return checkpoint_path(ckpt_dir, state.step)


def ema_transformer(cfg: T2IConfig, ckpt: Path, caption_channels: int) -> torch.nn.Module:
    """The EMA weights of a checkpoint in a fresh transformer (what gets exported and sampled)."""
    state = load_checkpoint(ckpt)
    model = build_transformer(cfg, caption_channels)
    model.load_state_dict(state["ema"])
    return copy.deepcopy(model).eval()
