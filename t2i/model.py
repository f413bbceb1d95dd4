"""The text-conditioned DiT (diffusers ``PixArtTransformer2DModel``) and its noise schedules."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from torch import nn

from t2i.config import T2IConfig


def build_transformer(cfg: T2IConfig, caption_channels: int) -> PixArtTransformer2DModel:
    """DiT with adaLN-single timestep conditioning and cross-attention to the text tokens.

    ``caption_channels`` is the text encoder's width; PixArt projects it to the DiT width.
    """
    model = PixArtTransformer2DModel(
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
    init_pixart_weights(model)
    return model


@torch.no_grad()
def init_pixart_weights(model: PixArtTransformer2DModel) -> None:
    """PixArt-alpha's ``initialize_weights`` (after DiT's), which diffusers' constructor does not apply.

    Xavier-uniform linears with zero biases; the patch embedding like a linear; N(0, 0.02) for the timestep and
    caption MLPs and the adaLN-single projection; zero cross-attention output projections and a zero output
    layer, so that every block starts as the identity on its cross-attention branch and the model predicts 0.
    The sin-cos position table and the per-block ``scale_shift_table`` (randn / sqrt(width)) already match.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
    timestep = model.adaln_single.emb.timestep_embedder
    caption = model.caption_projection
    for linear in (timestep.linear_1, timestep.linear_2, model.adaln_single.linear, caption.linear_1, caption.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    zeroed = [block.attn2.to_out[0] for block in model.transformer_blocks] + [model.proj_out]
    for linear in zeroed:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


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
