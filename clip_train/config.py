"""CLIP training config: a flat dataclass filled from a preset file, then from overrides.

Presets are plain YAML in ``clip_train/presets`` so two setups can be diffed line by line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption_mixing import presets
from caption_mixing.long_captions import POLICIES as LONG_CAPTION_POLICIES
from caption_mixing.mixing import ALT, PER_SAMPLE, PER_VISIT, Mixture
from caption_mixing.presets import parse_overrides
from caption_mixing.schedules import PSchedule, parse_schedule

__all__ = ["ClipTrainConfig", "list_presets", "load_config", "parse_overrides", "validate"]

PRESET_DIR = Path(__file__).parent / "presets"
PRECISIONS = ("fp32", "amp_bf16", "amp")
LOGGERS = ("tensorboard", "wandb", "none")


@dataclass
class ClipTrainConfig:
    model: str = "EmbeddedCLIP-Tiny"
    train_shards: str | None = "embedded"  # brace pattern(s) joined by "::", or "embedded"
    sidecar_dir: str | None = None  # where synthetic-caption sidecars live; default: beside the shards
    eval_tasks: str | None = "embedded"  # "embedded" or a comma list of name=path
    synthetic_source: str = "altogether"
    p: float = 0.15  # share of synthetic captions (all synthetic sources together)
    # Mixing beyond one synthetic source (see caption_mixing.Mixture / schedules / long_captions):
    captions: str | None = None  # "alt=0.85,altogether_r3=0.15"; None: alt-text + synthetic_source at p
    caption_fallback: str = ALT  # comma list: sources to try, in order, when the drawn one is missing
    mix_mode: str = PER_VISIT  # per_visit (the paper: drawn anew each epoch) | per_sample (fixed across epochs)
    p_schedule: str | None = None  # p over training: constant:P | linear:P0:P1[:T0:T1] | step:P@T,...
    long_captions: str = "head"  # captions longer than the text context: head | sentences | random_window
    seed: int = 0
    batch_size: int = 128
    samples_seen: int = 51200
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "fp32"  # fp32 | amp_bf16 | amp (fp16 with a GradScaler)
    workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 2000
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    # Scale: batch_size is the global batch; each rank runs batch_size / (world_size * accum_freq).
    accum_freq: int = 1  # micro-batches per optimizer step, open_clip's feature-cache accumulation
    local_loss: bool = True  # ClipLoss: each rank scores its rows against all gathered columns
    gather_with_grad: bool = True  # ClipLoss: all-gather keeps the graph (exact global gradient)
    grad_checkpointing: bool = False  # model.set_grad_checkpointing(): trade compute for memory
    torch_compile: bool = False  # torch.compile the model
    grad_clip_norm: float | None = None
    # Epoch length: steps per epoch = train_num_samples // batch_size on every rank (DDP needs equal
    # counts). None: the data's known size (embedded testbed); unknown and one process: one pass.
    train_num_samples: int | None = None
    resampled: bool = False  # draw shards with replacement (fewer shards than ranks x workers)
    # Logging and periodic quick zero-shot eval (rank 0 only).
    logger: str = "tensorboard"  # comma list of tensorboard, wandb; or none
    eval_every: int = 0  # steps between quick zero-shot evals; 0 = off
    quick_eval_tasks: str | None = None  # comma list of eval task names; None = all of eval_tasks
    preset: str | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps: seen pairs / global batch."""
        return max(1, self.samples_seen // self.batch_size)

    def local_batch_size(self, world_size: int) -> int:
        """Per-rank micro-batch; the global batch must split evenly over ranks and accumulation."""
        parts = world_size * self.accum_freq
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size={self.batch_size} (global) is not divisible by world size {world_size} "
                f"x accum_freq {self.accum_freq} = {parts}; set --set batch_size to a multiple of {parts}"
            )
        return self.batch_size // parts

    def mixture(self) -> Mixture:
        """The caption mixture for this run: ``captions``' sources rescaled so the synthetic ones share p."""
        if self.captions is None:
            return Mixture.from_p(self.p, self.synthetic_source, mode=self.mix_mode)
        mix = Mixture.parse(self.captions, fallback=self.caption_fallback, mode=self.mix_mode, flag="captions")
        if ALT not in mix.sources:
            raise ValueError(f"captions={self.captions!r}: name alt-text as {ALT!r} (e.g. {ALT}=0.85,altogether=0.15)")
        if not any(w > 0 for n, w in mix.weights if n != ALT):
            if self.p != 0:
                raise ValueError(f"captions={self.captions!r} gives synthetic captions no weight, but p={self.p:g}")
            return mix
        return mix.with_synthetic_share(self.p)

    def schedule(self) -> PSchedule | None:
        return None if self.p_schedule is None else parse_schedule(self.p_schedule, flag="p_schedule")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": self.steps}


def list_presets() -> list[str]:
    return presets.list_presets(PRESET_DIR)


def load_config(preset: str = "embedded", overrides: dict[str, Any] | None = None) -> ClipTrainConfig:
    """Resolve a preset (name in clip_train/presets or a YAML path) plus overrides."""
    overrides = overrides or {}
    values = presets.resolve_preset(ClipTrainConfig, PRESET_DIR, preset, overrides)
    if values.get("captions") and "p" not in overrides:  # p follows the written mixture
        weights = Mixture.parse(values["captions"], flag="captions").weights
        values["p"] = round(1.0 - dict(weights).get(ALT, 0.0), 12)
    cfg = ClipTrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: ClipTrainConfig) -> None:
    if not 0.0 <= cfg.p <= 1.0:
        raise ValueError(f"p={cfg.p} is outside [0, 1]")
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for key in ("accum_freq", "samples_seen", "checkpoint_every", "log_every"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("workers", "eval_every", "keep_last", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.batch_size % cfg.accum_freq:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by accum_freq={cfg.accum_freq}")
    if cfg.train_num_samples is not None and cfg.train_num_samples < cfg.batch_size:
        raise ValueError(f"train_num_samples={cfg.train_num_samples} is less than one global batch ({cfg.batch_size})")
    if cfg.resampled and cfg.train_num_samples is None:
        raise ValueError("resampled=true needs train_num_samples (the epoch length); set --set train_num_samples=N")
    bad = [x for x in cfg.logger.split(",") if x.strip() not in LOGGERS]
    if bad:
        raise ValueError(f"logger: {bad[0]!r} is not one of {', '.join(LOGGERS)}")
    if cfg.mix_mode not in (PER_VISIT, PER_SAMPLE):
        raise ValueError(f"mix_mode must be {PER_VISIT} or {PER_SAMPLE}, got {cfg.mix_mode!r}")
    if cfg.long_captions not in LONG_CAPTION_POLICIES:
        raise ValueError(f"long_captions must be one of {', '.join(LONG_CAPTION_POLICIES)}, got {cfg.long_captions!r}")
    cfg.mixture()  # raises naming the key on a malformed captions spec
    cfg.schedule()
    if cfg.train_shards is None:
        raise ValueError("train_shards is not set: pass --set train_shards='/data/cc12m/{00000..01242}.tar'")
