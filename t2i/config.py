"""Text-to-image training config: a flat dataclass filled from a preset file, then from overrides.

Presets are plain YAML in ``t2i/presets`` so two setups can be diffed line by line; unknown keys
get the closest known names; errors name the file or flag. The caption-mixing fields (``p``,
``captions``, ``mix_mode``, ``p_schedule``, ``long_captions``, ...) are ``MixingFields``, shared
with CLIP training and resolved by ``caption_mixing.mixconfig.mixing_plan``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from caption_mixing import presets
from caption_mixing.mixconfig import MixingFields, validate_mixing
from caption_mixing.presets import parse_overrides
from training.steplog import LOGGERS

__all__ = ["EMBEDDED", "T2IConfig", "list_presets", "load_config", "parse_overrides", "validate"]

PRESET_DIR = Path(__file__).parent / "presets"
EMBEDDED = "embedded"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers DDPMScheduler names
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class T2IConfig(MixingFields):
    DERIVED_KEYS: ClassVar[dict[str, str]] = {"steps": "max_steps (or epochs)"}

    # --- transformer (diffusers PixArtTransformer2DModel = text-conditioned DiT) ---
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    patch_size: int = 2
    latent_size: int = 16  # latent side = resolution / VAE factor
    latent_channels: int = 4
    activation_fn: str = "gelu-approximate"  # GELU-tanh, as DiT
    learned_sigma: bool = False  # out_channels 2x; the sigma half is trained with the VLB term
    # --- frozen parts: local paths or "embedded" (built by the suite on the testbed) ---
    resolution: int = 64
    vae: str = EMBEDDED  # diffusers AutoencoderKL folder (config.json + weights)
    text_encoder: str = EMBEDDED  # HF folder (text_encoder/ + tokenizer/) or an open_clip checkpoint file
    text_encoder_model: str | None = None  # open_clip model name when text_encoder is an open_clip checkpoint
    max_sequence_length: int = 64  # tokens the text encoder sees (77 for CLIP, 120 for PixArt's T5)
    # --- data ---
    train_shards: str | None = EMBEDDED  # image shards: brace pattern(s) joined by "::", or "embedded"
    train_latents: str | None = None  # precomputed latent shards (python -m t2i precompute); used instead of images
    sidecar_dir: str | None = None  # synthetic-caption sidecars; default: beside the (image) shards
    holdout_shards: str | None = EMBEDDED  # held-out image shards whose captions are the eval prompts
    dataset_size: int | None = None  # samples per epoch, to turn epochs into steps (embedded: from the testbed)
    p: float = 1.0  # share of synthetic captions (the other mixing fields: caption_mixing.mixconfig.MixingFields)
    seed: int = 0
    # --- optimisation (paper Table 11; PixArt's AdamW wd 0.03, EMA 0.9999) ---
    batch_size: int = 64  # global batch
    epochs: float = 24.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1  # share of samples trained with the empty prompt (for CFG)
    precision: str = "fp32"  # fp32 | bf16
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # torch.compile the DiT (inductor); checkpoints and EMA keep plain weights
    # --- diffusion (DiT: DDPM linear schedule, epsilon prediction) ---
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear (DiT) | squaredcos_cap_v2 (improved DDPM's cosine; keeps signal at 32 px)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    # epsilon (DiT) | v_prediction (Salimans & Ho 2022) | sample (x0; Li & He 2025 "Back to Basics": still trains when
    # a patch holds more values than the DiT's width, where epsilon and v cannot); the pipeline samples the same
    prediction_type: str = "epsilon"
    # Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers train_text_to_image --snr_gamma): each timestep's
    # MSE is weighted by min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v) or / 1 (x0), so nearly clean steps
    # (texture) stop dominating the gradient. null = DiT's uniform weighting (the paper's recipe); Hang et al.
    # recommend 5.0.
    snr_gamma: float | None = None
    # Timesteps are drawn with density proportional to t^(k-1) (t = T * u^(1/k), u uniform): 1 = uniform (DiT); 2
    # draws the noisy steps, where a small model decides layout and colour, more often (one-square probe:
    # benchmarks/RESULTS.md).
    timestep_power: float = 1.0
    # --- loader, checkpoints, logging ---
    workers: int = 1
    shuffle_buffer: int = 1000
    checkpoint_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    logger: str = "tensorboard"  # comma list of tensorboard, wandb; or none (train_log.jsonl is always written)
    allow_pickle_weights: bool = False  # load .bin/.ckpt weights of vae/text_encoder when no safetensors exist
    # --- evaluation (Table 5: CLIP similarity with original and synthetic prompt) ---
    eval_prompts: int = 32  # held-out samples; each gives one alt-text and one synthetic prompt
    eval_clip_model: str = EMBEDDED  # open_clip model name, or "embedded" (the testbed CLIP)
    eval_clip_checkpoint: str | None = None  # local open_clip checkpoint for eval_clip_model
    fid_inception_weights: str | None = None  # local FID Inception weights; FID is skipped without them
    sample_steps: int = 20
    guidance_scale: float = 4.5
    sample_seed: int = 0
    grid_prompts: int = 8
    # --- embedded components (only used when vae / text_encoder / eval_clip_model are "embedded") ---
    embedded_vae_steps: int = 300
    embedded_clip_samples: int = 51200
    embedded_clip_p: float = 0.5
    preset: str | None = None

    @property
    def out_channels(self) -> int:
        return self.latent_channels * (2 if self.learned_sigma else 1)

    def steps_for(self, dataset_size: int | None) -> int:
        """Optimizer steps: ``max_steps``, else epochs x samples / global batch."""
        if self.max_steps:
            return self.max_steps
        n = self.dataset_size or dataset_size
        if not n:
            raise ValueError("set dataset_size (samples per epoch) or max_steps to know how long to train")
        return max(1, math.ceil(self.epochs * n / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def list_presets() -> list[str]:
    return presets.list_presets(PRESET_DIR)


def load_config(preset: str = EMBEDDED, overrides: dict[str, Any] | None = None) -> T2IConfig:
    """Resolve a preset (name in t2i/presets or a YAML path) plus overrides."""
    cfg = T2IConfig(**presets.resolve_preset(T2IConfig, PRESET_DIR, preset, overrides))
    validate(cfg)
    return cfg


def check_sample_steps(steps: int, name: str = "sample_steps") -> int:
    """PixArt's pipeline reads a one-step call as a distilled (DMD) model's and indexes a second output that
    DPM-Solver does not return (IndexError after the model has run), so sampling needs at least 2 steps."""
    if steps < 2:
        raise ValueError(f"{name}={steps}: sampling needs at least 2 DPM-Solver steps")
    return steps


def validate(cfg: T2IConfig) -> None:
    """Fail at config time, naming the key, rather than deep inside diffusers."""
    validate_mixing(cfg)
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"caption_dropout={cfg.caption_dropout} is outside [0, 1)")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    unknown = {k.strip() for k in cfg.logger.split(",")} - set(LOGGERS)
    if unknown:
        raise ValueError(f"logger={cfg.logger!r}: unknown {sorted(unknown)}; use a comma list of {', '.join(LOGGERS)}")
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={cfg.beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={cfg.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    if cfg.learned_sigma and cfg.prediction_type != "epsilon":
        raise ValueError("learned_sigma=true needs prediction_type=epsilon (the VLB term is written for epsilon)")
    if cfg.snr_gamma is not None and not cfg.snr_gamma > 0:
        raise ValueError(f"snr_gamma={cfg.snr_gamma} must be > 0 (or null for uniform weighting)")
    if not cfg.timestep_power > 0:
        raise ValueError(f"timestep_power={cfg.timestep_power} must be > 0 (1 = uniform timesteps)")
    check_sample_steps(cfg.sample_steps)
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if cfg.latent_size % cfg.patch_size:
        raise ValueError(f"latent_size={cfg.latent_size} is not divisible by patch_size={cfg.patch_size}")
    if cfg.vae == EMBEDDED and cfg.resolution not in (cfg.latent_size * f for f in (1, 2, 4)):
        raise ValueError(
            f"resolution={cfg.resolution}, latent_size={cfg.latent_size}: the embedded VAE downsamples by 1, 2 or 4, "
            "so resolution must be latent_size x 1, 2 or 4"
        )
    if cfg.batch_size <= 0 or cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size={cfg.batch_size} must be positive and divisible by grad_accum={cfg.grad_accum}")
    if cfg.train_shards is None and cfg.train_latents is None:
        raise ValueError(
            "neither train_shards nor train_latents is set: pass --set train_latents='/data/lat/{00000..01242}.tar'"
        )
    if cfg.text_encoder != EMBEDDED and Path(cfg.text_encoder).is_file() and not cfg.text_encoder_model:
        raise ValueError(
            f"text_encoder={cfg.text_encoder!r} is an open_clip checkpoint file: set text_encoder_model too"
        )
