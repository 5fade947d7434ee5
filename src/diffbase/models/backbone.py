"""The one interface a family offers to training: prompts, images, the denoiser call, noise and targets.

Everything reuses the family's diffusers pipeline (its `encode_prompt`, packing and id helpers),
so training sees exactly the tensors the pipeline builds at inference. Latents are always
handled unpacked, (B, C, H, W), in the normalised space the denoiser works in:

- SD1.5 / SDXL: z * scaling_factor (4 channels, H/8)
- SD3.5, FLUX.1: (z - shift_factor) * scaling_factor (16 channels, H/8)
- FLUX.2: z patchified 2x2 (128 channels, H/16), then normalised by the VAE's BatchNorm statistics
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffbase.models.specs import FamilySpec

Cond = dict[str, torch.Tensor]


@dataclass
class Conditioning:
    """What a method adds to one denoiser call beyond the noisy latents and the text; `denoise` builds
    the call from it for every family, so methods never touch a pipeline's packing or id helpers.

    - `tokens` / `token_ids`: extra image tokens (packed reference latents, see `pack` and
      `reference_ids`) appended after the noisy tokens; the output is sliced back to the noisy
      tokens (FLUX.1 Kontext, FLUX.2 reference images).
    - `channels`: extra input channels on the latent grid (B, C, H, W), joined to the noisy latents
      along the channels (packed the same way for FLUX: FLUX.1 Fill's masked latent and mask).
    - `residuals`: ControlNet outputs, passed to the denoiser in its dtype.
    """

    tokens: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    residuals: dict[str, Any] | None = None


@dataclass
class Backbone:
    spec: FamilySpec
    pipe: Any
    controlnet: Any = None  # set while a ControlNet is trained on this backbone
    forward: Any = None  # the denoiser as wrapped for training (DDP/FSDP): calls go through it so gradients sync
    adapters: dict[str, Any] = field(default_factory=dict)  # modules a method adds beside the denoiser (DreamFit)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.spec.denoiser)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device


def prediction_kind(bb: Backbone) -> str:
    """ "epsilon", "v_prediction" or "flow": what the denoiser predicts, hence the training target."""
    if bb.spec.prediction == "flow":
        return "flow"
    return bb.pipe.scheduler.config.get("prediction_type", "epsilon")


# --------------------------------------------------------------------------- prompts


@torch.no_grad()
def encode_prompts(bb: Backbone, prompts: list[str], image_hw: tuple[int, int] | None = None) -> Cond:
    """The text conditioning the denoiser needs, computed by the pipeline's own `encode_prompt`."""
    pipe, device, family = bb.pipe, bb.device, bb.family
    if family == "sd15":
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if image_hw is not None:
            cond["add_time_ids"] = sdxl_time_ids(bb, image_hw, len(prompts))
        return cond
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False, **text_length(pipe, family)
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "flux1":
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device, **text_length(pipe, family))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}
    embeds, text_ids = pipe.encode_prompt(prompts, device=device)  # FLUX.2 dev and klein
    return {"prompt_embeds": embeds, "text_ids": text_ids}


def text_length(pipe: Any, family: str) -> dict[str, int]:
    """A T5 sequence length below the pipeline's default, when the saved tokenizer says so (toy models);
    otherwise nothing, so the pipeline's own default (FLUX.1 512, SD3 256) applies."""
    tok = {"flux1": "tokenizer_2", "sd3": "tokenizer_3"}.get(family)
    default = {"flux1": 512, "sd3": 256}.get(family)
    length = getattr(getattr(pipe, tok, None), "model_max_length", None) if tok else None
    return {"max_sequence_length": int(length)} if length is not None and length < default else {}


def sdxl_time_ids(bb: Backbone, image_hw: tuple[int, int], batch: int) -> torch.Tensor:
    """SDXL's size conditioning for an uncropped image of this size (original = target, no crop)."""
    proj = bb.pipe.text_encoder_2.config.projection_dim
    ids = bb.pipe._get_add_time_ids(tuple(image_hw), (0, 0), tuple(image_hw), torch.float32, proj)
    return ids.repeat(batch, 1).to(bb.device)


# --------------------------------------------------------------------------- images


def _vae_stats(bb: Backbone, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bn = bb.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(like)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bb.vae.config.batch_norm_eps).to(like)
    return mean, std


@torch.no_grad()
def encode_distribution(bb: Backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> the VAE posterior's (mean, std): what a latent cache stores, so training
    can still draw a fresh latent sample every step."""
    vae = bb.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def normalize(bb: Backbone, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the normalised space the denoiser works in, as the family's pipeline does it."""
    if bb.family == "flux2":
        z = bb.pipe._patchify_latents(z)
        mean, std = _vae_stats(bb, z)
        return (z - mean) / std
    shift = bb.vae.config.get("shift_factor") or 0.0
    return (z - shift) * bb.vae.config.scaling_factor


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
    latents = latents.to(vae.device, vae.dtype)
    if bb.family == "flux2":
        mean, std = _vae_stats(bb, latents)
        z = bb.pipe._unpatchify_latents(latents * std + mean)
    else:
        z = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    return vae.decode(z, return_dict=False)[0].clamp(-1, 1)


# --------------------------------------------------------------------------- FLUX token layout


def pack(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, tokens, channels) as the FLUX pipelines feed their transformers."""
    b, c, h, w = latents.shape
    if bb.family == "flux1":
        return bb.pipe._pack_latents(latents, b, c, h, w)
    return bb.pipe._pack_latents(latents)


def unpack(bb: Backbone, tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of `latent_hw`."""
    h, w = latent_hw
    b, _, ch = tokens.shape
    if bb.family == "flux1":
        x = tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, ch // 4, h, w)
    return tokens.view(b, h, w, ch).permute(0, 3, 1, 2)


def image_ids(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Position ids of the latent tokens: 3 axes (t, h, w) for FLUX.1, 4 axes (t, h, w, l) for FLUX.2."""
    b, _, h, w = latents.shape
    if bb.family == "flux1":
        return bb.pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return bb.pipe._prepare_latent_ids(latents).to(latents.device)


def reference_ids(bb: Backbone, latents: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Position ids of reference image `index`'s tokens, as the family's editing pipeline gives them:
    FLUX.1 Kontext puts the reference grid at t = 1 (one reference); FLUX.2 puts reference i at
    t = 10 + 10 * i (its pipeline's `_prepare_image_ids` with scale 10)."""
    if bb.family == "flux1":
        if index:
            raise ValueError("FLUX.1 Kontext takes one reference image")
        ids = image_ids(bb, latents).clone()
        ids[..., 0] = 1
        return ids
    count = latents.shape[-2] * latents.shape[-1]
    if bb.spec.pipeline == "Flux2KleinInpaintPipeline":  # its helper takes batched latents and a batch size
        ids = bb.pipe._prepare_image_ids([latents[:1]] * (index + 1), 1, scale=10)[..., -count:, :]
    else:
        ids = bb.pipe._prepare_image_ids([latents[0]] * (index + 1), scale=10)[..., -count:, :]  # (1, N, 4)
    return ids.expand(latents.shape[0], -1, -1).to(latents.device)


def image_seq_len(bb: Backbone, latent_hw: tuple[int, int]) -> int:
    h, w = latent_hw
    if bb.family == "flux1":
        return (h // 2) * (w // 2)
    if bb.family == "sd3":
        p = bb.denoiser.config.patch_size
        return (h // p) * (w // p)
    return h * w


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
    model, family = bb.denoiser, bb.family
    call = bb.forward or model
    c = conditioning or Conditioning()
    latents = latents.to(model.dtype)
    extra = {k: _cast(v, model.dtype) for k, v in (c.residuals or {}).items()}
    if family != "flux1" and family != "flux2" and c.channels is not None:
        latents = torch.cat([latents, c.channels.to(latents)], dim=1)
    if family in ("sd15", "sdxl"):
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"]}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["pooled_prompt_embeds"],
                "time_ids": cond["add_time_ids"],
            }
        return call(latents, timesteps, **kwargs, **extra, return_dict=False)[0]
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    if family == "sd3":
        return call(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
            **extra,
        )[0]
    g = None
    if model.config.guidance_embeds:
        g = torch.full(
            [latents.shape[0]], 1.0 if guidance is None else guidance, device=latents.device, dtype=torch.float32
        )
    tokens, ids = pack(bb, latents), image_ids(bb, latents)
    count = tokens.shape[1]
    if c.channels is not None:  # Fill: [noisy | masked latent | mask] per token
        tokens = torch.cat([tokens, pack(bb, c.channels.to(latents))], dim=-1)
    if c.tokens is not None:  # references after the noisy tokens, with their own ids
        tokens = torch.cat([tokens, c.tokens.to(latents)], dim=1)
        ids = torch.cat([ids, c.token_ids.to(ids)], dim=-2)
    kwargs = {
        "hidden_states": tokens,
        "timestep": t / 1000,
        "guidance": g,
        "encoder_hidden_states": cond["prompt_embeds"],
        "txt_ids": cond["text_ids"],
        "img_ids": ids,
        "return_dict": False,
    }
    if family == "flux1":
        kwargs["pooled_projections"] = cond["pooled_prompt_embeds"]
    out = call(**kwargs, **extra)[0][:, :count]
    return unpack(bb, out, latents.shape[-2:])


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
    family = bb.family
    inner = getattr(controlnet, "module", controlnet)  # attributes live on the unwrapped model
    latents = latents.to(inner.dtype)
    if family in ("sd15", "sdxl"):
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"]}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["pooled_prompt_embeds"],
                "time_ids": cond["add_time_ids"],
            }
        down, mid = controlnet(
            latents, timesteps, controlnet_cond=(control + 1) / 2, conditioning_scale=scale, return_dict=False, **kwargs
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    control_latents = normalize(bb, encode_distribution(bb, control)[0]).to(latents)
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    if family == "sd3":
        blocks = controlnet(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            controlnet_cond=control_latents,
            conditioning_scale=scale,
            return_dict=False,
        )[0]
        return {"block_controlnet_hidden_states": blocks}
    g = None
    if inner.config.guidance_embeds:
        g = torch.full(
            [latents.shape[0]], 1.0 if guidance is None else guidance, device=latents.device, dtype=torch.float32
        )
    blocks, single = controlnet(
        hidden_states=pack(bb, latents),
        controlnet_cond=pack(bb, control_latents),
        conditioning_scale=scale,
        timestep=t / 1000,
        guidance=g,
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=cond["text_ids"],
        img_ids=image_ids(bb, latents),
        return_dict=False,
    )
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}


# --------------------------------------------------------------------------- noise and targets


def ddpm_alphas_cumprod(bb: Backbone) -> torch.Tensor:
    """The training noise schedule of an epsilon / v model, from its scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(bb.pipe.scheduler.config).alphas_cumprod


def add_noise(bb: Backbone, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t. Flow: t is sigma in [0, 1]; DDPM: t is an integer timestep."""
    if prediction_kind(bb) == "flow":
        s = t.to(latents).view(-1, 1, 1, 1)
        return (1.0 - s) * latents + s * noise
    a = ddpm_alphas_cumprod(bb).to(latents.device)[t].to(latents).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1.0 - a).sqrt() * noise


def target(bb: Backbone, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: noise (epsilon), velocity (v) or noise - x0 (flow)."""
    kind = prediction_kind(bb)
    if kind == "flow":
        return noise - latents
    if kind == "epsilon":
        return noise
    a = ddpm_alphas_cumprod(bb).to(latents.device)[t].to(latents).view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1.0 - a).sqrt() * latents


def model_timesteps(bb: Backbone, t: torch.Tensor) -> torch.Tensor:
    """Training time -> the timestep values the denoiser takes (sigma * 1000 for flow models)."""
    return t.float() * 1000.0 if prediction_kind(bb) == "flow" else t
