"""Stable Diffusion 3.5: an MMDiT on 16-channel latents, CLIP-L, CLIP-G and T5 (256 tokens), flow matching."""

from __future__ import annotations

import functools
from typing import Any

import torch

from diffbase.models.families import flux
from diffbase.models.families.record import CLIP_G, ControlNetSupport, Family, FamilySpec, TextEncoderSpec, t5_length

text_length = functools.partial(t5_length, tokenizer="tokenizer_3", default=256)


def encode_prompts(bb: Any, prompts: list[str], image_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = bb.pipe.encode_prompt(prompts, None, None, device=bb.device,
                                                 do_classifier_free_guidance=False, **text_length(bb.pipe))  # fmt: skip
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def denoise(bb: Any, call: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
            guidance: float | None, c: Any, extra: dict[str, Any]) -> torch.Tensor:  # fmt: skip
    if c.channels is not None:
        latents = torch.cat([latents, c.channels.to(latents)], dim=1)
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    return call(hidden_states=latents, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False, **extra)[0]  # fmt: skip


def seq_len(bb: Any, latent_hw: tuple[int, int]) -> int:
    p = bb.denoiser.config.patch_size
    return (latent_hw[0] // p) * (latent_hw[1] // p)


def controlnet_residuals(bb: Any, controlnet: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                         cond: dict[str, torch.Tensor], control: torch.Tensor, scale: float,
                         guidance: float | None, encode: Any) -> dict[str, Any]:  # fmt: skip
    """SD3's ControlNet takes the control image's normalised latent (`encode`: the posterior mean)."""
    control_latents = encode(control).to(latents)
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    blocks = controlnet(hidden_states=latents, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], controlnet_cond=control_latents,
                        conditioning_scale=scale, return_dict=False)[0]  # fmt: skip
    return {"block_controlnet_hidden_states": blocks}


def make_controlnet(denoiser: torch.nn.Module, layers: int | None, single: int | None) -> torch.nn.Module:
    import diffusers

    return diffusers.SD3ControlNetModel.from_transformer(
        denoiser,
        num_layers=layers or max(1, min(12, denoiser.config.num_layers - 1)),
        num_extra_conditioning_channels=0,
    )


CLIP_L_PROJECTED = TextEncoderSpec(
    "text_encoder", "tokenizer", "clip_l", "clip", "CLIPTextConfig", "CLIPTextModelWithProjection", 77
)
SPECS = (
    FamilySpec(
        name="sd3", family="sd3", pipeline="StableDiffusion3Pipeline", denoiser="transformer",
        denoiser_class="SD3Transformer2DModel", vae_class="AutoencoderKL",
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        text_encoders=(CLIP_L_PROJECTED, CLIP_G,
                       TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", "t5", "T5Config", "T5EncoderModel", 256)),
        prediction="flow", variants=("large", "medium", "tiny"),
        pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
    ),
)  # fmt: skip

FAMILY = Family(
    name="sd3",
    title="SD3.5",
    specs=SPECS,
    size_multiple=16,
    encode_prompts=encode_prompts,
    denoise=denoise,
    lora_targets=flux.JOINT,
    lora_markers=("transformer.transformer_blocks", "joint_blocks", "transformer_blocks."),
    text_length=text_length,
    seq_len=seq_len,
    controlnet=ControlNetSupport(
        "SD3ControlNetModel",
        make_controlnet,
        "StableDiffusion3ControlNetPipeline",
        "control_image",
        controlnet_residuals,
    ),  # fmt: skip
)
