"""CLIP training config: a flat dataclass filled from a preset file, then from overrides.

Presets are plain YAML in ``clip_train/presets`` so two setups can be diffed line by line. The
mixing fields (p, captions, fallback, mode, schedule, long captions, blank alt-text) come from
``caption_mixing.mixconfig.MixingFields``, shared with t2i, and are validated there once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from caption_mixing import presets
from caption_mixing.mixconfig import MixingFields, validate_mixing
from caption_mixing.presets import parse_overrides

__all__ = ["ClipTrainConfig", "list_presets", "load_config", "parse_overrides", "validate"]

PRESET_DIR = Path(__file__).parent / "presets"
PRECISIONS = ("fp32", "amp_bf16", "amp")
TEXT_MODES = ("mixed", "both")  # mixed: one caption per image (mix_mode's rule); both: alt-text AND synthetic
BOTH_LOSSES = ("both_mean", "multi_positive")  # text_mode=both: clip_train.step.BothCaptionsLoss
LOGGERS = ("tensorboard", "wandb", "none")


@dataclass
class ClipTrainConfig(MixingFields):
    # Keys a user may try to set that the config derives: `--set steps=...` names the field to set instead.
    DERIVED_KEYS: ClassVar[dict[str, str]] = {"steps": "samples_seen"}

    model: str = "EmbeddedCLIP-Tiny"
    train_shards: str | None = "embedded"  # brace pattern(s) joined by "::", or "embedded"
    sidecar_dir: str | None = None  # where synthetic-caption sidecars live; default: beside the shards
    # Evaluation (eval.tasks.parse_task_spec): groups (paper26, retrieval, datacomp, testbed), registry
    # names and ad-hoc NAME=PATH, comma-separated; "embedded" = the testbed group on the embedded testbed.
    eval_tasks: str | None = "embedded"
    eval_dataset_root: str | None = None  # where registry tasks are looked for (unused by NAME=PATH and embedded)
    eval_keep_going: bool = False  # missing eval data: skip those tasks (avg over k/N) instead of stopping
    eval_amp: bool = False  # evaluate under autocast; default fp32, as MetaCLIP's clipeval and `eval zeroshot`
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
    quick_eval_tasks: str | None = None  # comma list of names among eval_tasks; None = all of them
    preset: str | None = None
    # text_mode=both: each image trains on its alt-text and a synthetic caption in the same step, weighted
    # 1 - p and p (p is then the synthetic caption's weight, not a share of samples); both_loss picks the loss.
    text_mode: str = "mixed"
    both_loss: str = "both_mean"

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

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": self.steps}


def list_presets() -> list[str]:
    return presets.list_presets(PRESET_DIR)


def load_config(preset: str = "embedded", overrides: dict[str, Any] | None = None) -> ClipTrainConfig:
    """Resolve a preset (name in clip_train/presets or a YAML path) plus overrides, then validate."""
    values = presets.resolve_preset(ClipTrainConfig, PRESET_DIR, preset, overrides or {})
    cfg = ClipTrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: ClipTrainConfig) -> None:
    """Every field checked before anything runs; each error names its key."""
    validate_mixing(cfg)
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
    if cfg.quick_eval_tasks is not None and not cfg.eval_tasks:
        raise ValueError("quick_eval_tasks is set but eval_tasks is empty: name the tasks in eval_tasks")
    if cfg.text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {cfg.text_mode!r}")
    if cfg.both_loss not in BOTH_LOSSES:
        raise ValueError(f"both_loss must be one of {', '.join(BOTH_LOSSES)}, got {cfg.both_loss!r}")
    if cfg.text_mode == "both":
        if cfg.accum_freq != 1:
            raise ValueError(f"text_mode=both supports accum_freq=1 only (got accum_freq={cfg.accum_freq})")
        if cfg.mix_mode == "gate" or cfg.p_mode != "paper" or cfg.p_schedule is not None:
            raise ValueError(
                "text_mode=both weights both captions by p: it takes no mix_mode=gate, p_mode or p_schedule"
            )
    if cfg.train_shards is None:
        raise ValueError("train_shards is not set: pass --set train_shards='/data/cc12m/{00000..01242}.tar'")
