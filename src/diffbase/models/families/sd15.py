"""Stable Diffusion 1.5: a UNet on 4-channel latents (x 0.18215), one CLIP-L text encoder, epsilon prediction."""

from __future__ import annotations

from typing import Any

import torch

from diffbase.models.families import unet
from diffbase.models.families.record import CLIP_L, Family, FamilySpec


def encode_prompts(bb: Any, prompts: list[str], image_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    embeds, _ = bb.pipe.encode_prompt(prompts, bb.device, 1, False)
    return {"prompt_embeds": embeds}


SPECS = (
    FamilySpec(
        name="sd15", family="sd15", pipeline="StableDiffusionPipeline", denoiser="unet",
        denoiser_class="UNet2DConditionModel", vae_class="AutoencoderKL", scheduler_class="PNDMScheduler",
        text_encoders=(CLIP_L,), prediction="epsilon", variants=("base", "tiny", "toy"),
        pipeline_extras=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
    ),
)  # fmt: skip

FAMILY = Family(
    name="sd15",
    title="SD1.5",
    specs=SPECS,
    size_multiple=8,
    encode_prompts=encode_prompts,
    denoise=unet.denoise,
    lora_targets=unet.ATTENTION,
    lora_markers=unet.LORA_MARKERS,
    controlnet=unet.controlnet("StableDiffusionControlNetPipeline", sdxl=False),
)
