"""SDXL: a UNet with size conditioning (time ids) and two CLIP text encoders (L and the projected G)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from diffbase.models.families import unet
from diffbase.models.families.record import CLIP_G, CLIP_L, Family, FamilySpec


def time_ids(bb: Any, image_hw: tuple[int, int], batch: int) -> dict[str, torch.Tensor]:
    """SDXL's size conditioning for an uncropped image of this size (original = target, no crop)."""
    proj = bb.pipe.text_encoder_2.config.projection_dim
    ids = bb.pipe._get_add_time_ids(tuple(image_hw), (0, 0), tuple(image_hw), torch.float32, proj)
    return {"add_time_ids": ids.repeat(batch, 1).to(bb.device)}


def encode_prompts(bb: Any, prompts: list[str], image_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = bb.pipe.encode_prompt(prompts, device=bb.device, do_classifier_free_guidance=False)
    cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    return cond | time_ids(bb, image_hw, len(prompts)) if image_hw is not None else cond


SPECS = (
    FamilySpec(
        name="sdxl", family="sdxl", pipeline="StableDiffusionXLPipeline", denoiser="unet",
        denoiser_class="UNet2DConditionModel", vae_class="AutoencoderKL", scheduler_class="EulerDiscreteScheduler",
        text_encoders=(CLIP_L, CLIP_G), prediction="epsilon", variants=("base", "tiny"),
        pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
    ),
)  # fmt: skip

FAMILY = Family(
    name="sdxl",
    title="SDXL",
    specs=SPECS,
    size_multiple=8,
    encode_prompts=encode_prompts,
    denoise=functools.partial(unet.denoise, sdxl=True),
    lora_targets=unet.ATTENTION,
    lora_markers=unet.LORA_MARKERS,
    controlnet=unet.controlnet("StableDiffusionXLControlNetPipeline", sdxl=True),
    size_conditioning=time_ids,
)
