"""The one interface a family offers to training: prompts, images, the denoiser call, noise and targets.

Everything reuses the family's diffusers pipeline (its `encode_prompt`, packing and id helpers),
so training sees exactly the tensors the pipeline builds at inference. Latents are always
handled unpacked, (B, C, H, W), in the normalised space the denoiser works in:

- SD1.5 / SDXL: z * scaling_factor (4 channels, H/8)
- SD3.5, FLUX.1: (z - shift_factor) * scaling_factor (16 channels, H/8)
- FLUX.2: z patchified 2x2 (128 channels, H/16), then normalised by the VAE's BatchNorm statistics

What differs by family is in the family's module (models/families/): these functions dispatch to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffbase.models.families import get
from diffbase.models.families.record import Family, TokenLayout
from diffbase.models.families.types import Backbone, Cond, Conditioning
from diffbase.models.placement import compute_device, to_device

__all__ = ["Backbone", "Cond", "Conditioning", "Guide"]


def prediction_kind(bb: Backbone) -> str:
    """ "epsilon", "v_prediction" or "flow": what the denoiser predicts, hence the training target."""
    if bb.spec.prediction == "flow":
        return "flow"
    return bb.pipe.scheduler.config.get("prediction_type", "epsilon")


# --------------------------------------------------------------------------- prompts


def encode_prompts(bb: Backbone, prompts: list[str], image_hw: tuple[int, int] | None = None) -> Cond:
    """The text conditioning the denoiser needs, computed by the pipeline's own `encode_prompt`; with gradients
    only while a text encoder trains (bb.adapters["text_encoder_trains"])."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and "text_encoder_trains" in bb.adapters):
        return bb.behaviour.encode_prompts(bb, prompts, image_hw)


def text_length(pipe: Any, family: str) -> dict[str, int]:
    """A T5 sequence length below the pipeline's default, when the saved tokenizer says so (toy models);
    otherwise nothing, so the pipeline's own default (FLUX.1 512, SD3 256) applies."""
    return get(family).text_length(pipe)


def size_conditioning(bb: Backbone, image_hw: tuple[int, int], batch: int) -> Cond:
    """What the family conditions on besides the text for an image of this size (SDXL's time ids), if anything."""
    make = bb.behaviour.size_conditioning
    return make(bb, image_hw, batch) if make is not None else {}


# --------------------------------------------------------------------------- images


@torch.no_grad()
def encode_distribution(bb: Backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> the VAE posterior's (mean, std): what a latent cache stores, so training
    can still draw a fresh latent sample every step."""
    vae = bb.vae
    dist = vae.encode(to_device(pixels, compute_device(bb.pipe, vae), vae.dtype)).latent_dist
    return dist.mean, dist.std


def normalize(bb: Backbone, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the normalised space the denoiser works in, as the family's pipeline does it."""
    return bb.behaviour.normalize(bb, z)


@torch.no_grad()
def encode_images(
    bb: Backbone, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Pixels in [-1, 1] -> normalised latents (B, C, H, W), as the family's pipeline normalises them."""
    mean, std = encode_distribution(bb, pixels)
    z = mean + std * torch.randn(mean.shape, generator=generator).to(mean) if sample else mean
    return normalize(bb, z)


@torch.no_grad()
def decode_latents(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> pixels in [-1, 1]: the inverse path each pipeline takes after denoising."""
    vae = bb.vae
    z = bb.behaviour.denormalize(bb, latents.to(compute_device(bb.pipe, vae), vae.dtype))
    return vae.decode(z, return_dict=False)[0].clamp(-1, 1)


# --------------------------------------------------------------------------- FLUX token layout


def _layout(bb: Backbone) -> TokenLayout:
    layout = bb.behaviour.tokens
    if layout is None:
        raise ValueError(f"{bb.behaviour.title} does not lay its latents out as tokens")
    return layout


def pack(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, tokens, channels) as the FLUX pipelines feed their transformers."""
    return _layout(bb).pack(bb, latents)


def unpack(bb: Backbone, tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of `latent_hw`."""
    return _layout(bb).unpack(bb, tokens, latent_hw)


def image_ids(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Position ids of the latent tokens: 3 axes (t, h, w) for FLUX.1, 4 axes (t, h, w, l) for FLUX.2."""
    return _layout(bb).image_ids(bb, latents)


def reference_ids(bb: Backbone, latents: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Position ids of reference image `index`'s tokens, as the family's editing pipeline gives them:
    FLUX.1 Kontext puts the reference grid at t = 1 (one reference); FLUX.2 puts reference i at
    t = 10 + 10 * i (its pipeline's `_prepare_image_ids` with scale 10)."""
    return _layout(bb).reference_ids(bb, latents, index)


def image_seq_len(bb: Backbone, latent_hw: tuple[int, int]) -> int:
    return bb.behaviour.seq_len(bb, latent_hw)


# --------------------------------------------------------------------------- the denoiser call


def denoise(
    bb: Backbone,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond,
    guidance: float | None = None,
    conditioning: Conditioning | None = None,
) -> torch.Tensor:
    """One denoiser forward, built as the family's pipeline builds it; returns (B, C, H, W) for the
    noisy latents only.

    `timesteps` are in the scheduler's units (0..1000, i.e. sigma * 1000 for flow models);
    `conditioning` holds what a method adds (extra tokens, extra channels, ControlNet residuals).
    """
    model = bb.denoiser
    c = conditioning or Conditioning()
    extra = {k: _cast(v, model.dtype) for k, v in (c.residuals or {}).items()}
    return bb.behaviour.denoise(bb, bb.forward or model, latents.to(model.dtype), timesteps, cond, guidance, c, extra)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """ControlNet residuals in the denoiser's dtype, as diffusers' ControlNet training scripts cast them
    (a ControlNet trained in fp32 beside a bf16 denoiser)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    if isinstance(value, list | tuple):
        return type(value)(_cast(v, dtype) for v in value)
    return value


# What a method adds from the noisy latents at each denoiser call (a ControlNet's residuals as the
# denoiser's keyword arguments): (noisy, timesteps, cond, batch) -> residuals.
Guide = Callable[[torch.Tensor, torch.Tensor, Cond, dict[str, Any]], dict[str, Any]]


def controlnet_support(family: str) -> Family:
    """The family, when it has a ControlNet in diffusers (else a ValueError naming the ones that do)."""
    behaviour = get(family)
    if behaviour.controlnet is None:
        from diffbase.models.families import FAMILIES

        have = [f.title for f in FAMILIES.values() if f.controlnet is not None]
        raise ValueError(f"{behaviour.title} has no ControlNet model in diffusers (these do: {', '.join(have)})")
    return behaviour


def controlnet_residuals(
    bb: Backbone,
    controlnet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond,
    control: torch.Tensor,
    scale: float = 1.0,
    guidance: float | None = None,
) -> dict[str, Any]:
    """ControlNet outputs as the denoiser's keyword arguments, built as diffusers' ControlNet pipelines do.

    `control` is the control image in [-1, 1]: UNet ControlNets take it as pixels in [0, 1];
    SD3 and FLUX ControlNets take its normalised latent (the posterior mean).
    """
    inner = getattr(controlnet, "module", controlnet)  # attributes live on the unwrapped model
    latents = latents.to(inner.dtype)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return normalize(bb, encode_distribution(bb, pixels)[0])

    support = controlnet_support(bb.family).controlnet
    return support.residuals(bb, controlnet, latents, timesteps, cond, control, scale, guidance, encode)


# --------------------------------------------------------------------------- noise and targets


def ddpm_alphas_cumprod(bb: Backbone) -> torch.Tensor:
    """The training noise schedule of an epsilon / v model, from its scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(bb.pipe.scheduler.config).alphas_cumprod


def alphas_at(bb: Backbone, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at timesteps `t`, as (B, 1, 1, 1) in the latents' device and dtype: picked where `t` is, then
    queued to the device (no host wait)."""
    return to_device(ddpm_alphas_cumprod(bb).to(t.device)[t], latents).view(-1, 1, 1, 1)


def add_noise(bb: Backbone, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t. Flow: t is sigma in [0, 1]; DDPM: t is an integer timestep."""
    if prediction_kind(bb) == "flow":
        s = to_device(t, latents).view(-1, 1, 1, 1)
        return (1.0 - s) * latents + s * noise
    a = alphas_at(bb, t, latents)
    return a.sqrt() * latents + (1.0 - a).sqrt() * noise


def target(bb: Backbone, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: noise (epsilon), velocity (v) or noise - x0 (flow)."""
    kind = prediction_kind(bb)
    if kind == "flow":
        return noise - latents
    if kind == "epsilon":
        return noise
    a = alphas_at(bb, t, latents)
    return a.sqrt() * noise - (1.0 - a).sqrt() * latents


def model_timesteps(bb: Backbone, t: torch.Tensor) -> torch.Tensor:
    """Training time -> the timestep values the denoiser takes (sigma * 1000 for flow models)."""
    return t.float() * 1000.0 if prediction_kind(bb) == "flow" else t
