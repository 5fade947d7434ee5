"""Training-time noise levels and losses: DDPM (epsilon, v) and flow matching.

Flow matching follows diffusers' training scripts: sigma in (0, 1), x_t = (1 - sigma) x0 +
sigma noise, target noise - x0, model timestep sigma * 1000. DDPM uses integer timesteps
and the scheduler's `alphas_cumprod`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffbase.config import ObjectiveConfig
from diffbase.models.placement import to_device


def sample_u(cfg: ObjectiveConfig, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """u in (0, 1) by the configured density (uniform, logit-normal, or SD3's mode sampling)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        cfg.timestep_sampling, batch, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, generator=generator
    )


def resolution_mu(scheduler_config: dict[str, Any], image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift: mu grows linearly with the number of image tokens."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


def shift_sigmas(
    sigmas: torch.Tensor, cfg: ObjectiveConfig, scheduler_config: dict[str, Any], image_seq_len: int
) -> torch.Tensor:
    """Apply the same shift the family's scheduler applies at inference, so training sees those noise levels."""
    if cfg.shift is None and scheduler_config.get("use_dynamic_shifting", False):
        mu = resolution_mu(scheduler_config, image_seq_len)
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shift = cfg.shift if cfg.shift is not None else scheduler_config.get("shift", 1.0)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_flow_sigmas(
    cfg: ObjectiveConfig,
    batch: int,
    scheduler_config: dict[str, Any],
    image_seq_len: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    u = sample_u(cfg, batch, generator).clamp(1e-5, 1.0 - 1e-5)
    return shift_sigmas(u, cfg, scheduler_config, image_seq_len)


def sample_ddpm_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v-prediction targets."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1.0) if kind == "v_prediction" else clipped / s


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """Mean squared error per sample (optionally only where `mask` is 1), weighted, averaged over the batch
    (or per sample with `reduce=False`, for methods that log loss terms by kind of sample)."""
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        mask = torch.nn.functional.interpolate(mask.float(), size=err.shape[-2:], mode="area").expand_as(err)
        per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-6)
    else:
        per_sample = err.flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * to_device(weights, per_sample)
    return per_sample.mean() if reduce else per_sample
