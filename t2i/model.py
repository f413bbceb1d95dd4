"""The text-conditioned DiT (diffusers ``PixArtTransformer2DModel``) and its noise schedules."""

from __future__ import annotations

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel

from t2i.config import T2IConfig


def build_transformer(cfg: T2IConfig, caption_channels: int) -> PixArtTransformer2DModel:
    """DiT with adaLN-single timestep conditioning and cross-attention to the text tokens.

    ``caption_channels`` is the text encoder's width; PixArt projects it to the DiT width.
    """
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.latent_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        cross_attention_dim=cfg.hidden_size,
        sample_size=cfg.latent_size,
        patch_size=cfg.patch_size,
        activation_fn=cfg.activation_fn,
        norm_type="ada_norm_single",
        caption_channels=caption_channels,
        use_additional_conditions=False,  # no resolution/aspect conditioning at a single 256 px size
    )


def schedule_kwargs(cfg: T2IConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def train_scheduler(cfg: T2IConfig) -> DDPMScheduler:
    """DDPM schedule of the config (DiT: linear 1e-4 to 0.02 over 1000 steps, epsilon prediction)."""
    variance = "learned_range" if cfg.learned_sigma else "fixed_small"
    return DDPMScheduler(**schedule_kwargs(cfg), variance_type=variance, clip_sample=False)


def sample_scheduler(cfg: T2IConfig) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ on the training schedule; what the exported pipeline samples with."""
    return DPMSolverMultistepScheduler(**schedule_kwargs(cfg), algorithm_type="dpmsolver++", solver_order=2)
