"""What the UNet families (SD1.5, SDXL) share: the denoiser call and the ControlNet, as their pipelines build them."""

from __future__ import annotations

from typing import Any

import torch

from diffbase.models.families.record import ControlNetSupport

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' DreamBooth LoRA scripts adapt attention only
LORA_MARKERS = ("unet.", "lora_unet_down_blocks", "lora_unet_input_blocks", "lora_unet_up_blocks", "lora_te")


def unet_kwargs(cond: dict[str, torch.Tensor], sdxl: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"]}
    if sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]}
    return kwargs


def denoise(bb: Any, call: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
            guidance: float | None, c: Any, extra: dict[str, Any], sdxl: bool = False) -> torch.Tensor:  # fmt: skip
    if c.channels is not None:  # inpainting UNets: [noisy | masked latent | mask]
        latents = torch.cat([latents, c.channels.to(latents)], dim=1)
    return call(latents, timesteps, **unet_kwargs(cond, sdxl), **extra, return_dict=False)[0]


def controlnet_residuals(bb: Any, controlnet: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                         cond: dict[str, torch.Tensor], control: torch.Tensor, scale: float,
                         guidance: float | None, encode: Any, sdxl: bool = False) -> dict[str, Any]:  # fmt: skip
    """A UNet ControlNet takes the control image as pixels in [0, 1]."""
    down, mid = controlnet(latents, timesteps, controlnet_cond=(control + 1) / 2, conditioning_scale=scale,
                           return_dict=False, **unet_kwargs(cond, sdxl))  # fmt: skip
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def make_controlnet(denoiser: torch.nn.Module, layers: int | None, single: int | None) -> torch.nn.Module:
    import diffusers

    return diffusers.ControlNetModel.from_unet(denoiser)


def controlnet(pipeline: str, sdxl: bool) -> ControlNetSupport:
    import functools

    residuals = functools.partial(controlnet_residuals, sdxl=sdxl)
    return ControlNetSupport("ControlNetModel", make_controlnet, pipeline, "image", residuals)
