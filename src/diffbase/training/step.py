"""One training step's loss: the same for every method and family.

Randomness (latent sample, noise, timestep) comes from a generator seeded by (seed, step,
sample index), never from global state, so a resumed run draws exactly what an
uninterrupted one would, and N processes draw what one process with N times the batch draws.
"""

from __future__ import annotations

from typing import Any

import torch

from diffbase.config import ObjectiveConfig
from diffbase.models import backbone as B
from diffbase.models.placement import to_device
from diffbase.training.objectives import (
    diffusion_loss,
    min_snr_weights,
    sample_ddpm_timesteps,
    sample_flow_sigmas,
)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + index) % (2**63))


def draw(
    bb: B.Backbone,
    cfg: ObjectiveConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    seed: int,
    step: int,
    indices: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: a latent from the VAE posterior, the noise, and the training time (sigma or timestep)."""
    latents, noises, times = [], [], []
    kind = B.prediction_kind(bb)
    seq_len = B.image_seq_len(bb, tuple(B.normalize(bb, mean[:1]).shape[-2:]))
    for j, index in enumerate(indices):
        g = sample_generator(seed, step, index)
        z = mean[j] + std[j] * to_device(torch.randn(mean[j].shape, generator=g), mean)
        latents.append(B.normalize(bb, z[None])[0])
        noise = torch.randn(latents[-1].shape, generator=g)
        if cfg.noise_offset:  # per channel, the same over the image (crosslabs' noise offset)
            noise = noise + cfg.noise_offset * torch.randn((noise.shape[0], *[1] * (noise.dim() - 1)), generator=g)
        noises.append(to_device(noise, mean))
        if kind == "flow":
            config = dict(bb.pipe.scheduler.config)
            times.append(sample_flow_sigmas(cfg, 1, config, seq_len, generator=g)[0])
        else:
            times.append(sample_ddpm_timesteps(1, bb.pipe.scheduler.config.num_train_timesteps, generator=g)[0])
    return torch.stack(latents), torch.stack(noises), torch.stack(times)


def diffusion_step_loss(
    bb: B.Backbone,
    cfg: ObjectiveConfig,
    batch: dict[str, Any],
    cond: B.Cond,
    seed: int,
    step: int,
    guide: B.Guide | None = None,
    weights: torch.Tensor | None = None,
    reduce: bool = True,
    conditioning: B.Conditioning | None = None,
) -> torch.Tensor:
    """The diffusion loss of one batch: `batch` has posterior `mean`/`std`, `index`, an optional loss `mask`
    (per sample with `reduce=False`); `conditioning`: what a method adds (reference tokens, channels);
    `guide`: residuals a method computes from the noisy latents (a ControlNet's)."""
    x0, noise, t = draw(bb, cfg, batch["mean"], batch["std"], seed, step, batch["index"])
    noisy = B.add_noise(bb, x0, noise, t)
    timesteps = to_device(B.model_timesteps(bb, t), x0.device)
    residuals = guide(noisy, timesteps, cond, batch) if guide is not None else None
    extra = conditioning or B.Conditioning()
    if residuals is not None:
        extra = B.Conditioning(extra.tokens, extra.token_ids, extra.channels, residuals)
    pred = B.denoise(bb, noisy, timesteps, cond, guidance=cfg.guidance, conditioning=extra)
    kind = B.prediction_kind(bb)
    w = weights
    if cfg.snr_gamma is not None and kind != "flow":
        snr_w = min_snr_weights(B.ddpm_alphas_cumprod(bb), t, cfg.snr_gamma, kind)
        w = snr_w if w is None else w * snr_w
    return diffusion_loss(pred, B.target(bb, x0, noise, t), w, batch.get("mask"), reduce=reduce)


@torch.no_grad()
def fixed_time_loss(
    bb: B.Backbone,
    cfg: ObjectiveConfig,
    batch: dict[str, Any],
    cond: B.Cond,
    times: list[float],
    seed: int = 0,
    guide: B.Guide | None = None,
) -> float:
    """Loss at fixed noise levels (fractions of the schedule) and fixed noise: a comparable number
    across steps, for validation and for tests that training lowers the loss."""
    x0 = B.normalize(bb, batch["mean"])
    kind = B.prediction_kind(bb)
    total = 0.0
    for k, frac in enumerate(times):
        noise = torch.stack([torch.randn(x0.shape[1:], generator=sample_generator(seed, k, i)) for i in batch["index"]])
        if kind == "flow":
            t = torch.full((x0.shape[0],), float(frac))
        else:
            t = torch.full((x0.shape[0],), round(frac * (bb.pipe.scheduler.config.num_train_timesteps - 1)))
        noisy = B.add_noise(bb, x0, noise.to(x0), t)
        timesteps = B.model_timesteps(bb, t).to(x0.device)
        residuals = guide(noisy, timesteps, cond, batch) if guide is not None else None
        pred = B.denoise(
            bb, noisy, timesteps, cond, guidance=cfg.guidance, conditioning=B.Conditioning(residuals=residuals)
        )
        total += diffusion_loss(pred, B.target(bb, x0, noise.to(x0), t), None, batch.get("mask")).item()
    return total / len(times)
