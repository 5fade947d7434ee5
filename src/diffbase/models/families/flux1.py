"""FLUX.1 (dev, schnell; Kontext and Fill are rows of it): a 2x2-packed MMDiT on 16-channel latents, CLIP-L
(pooled) and T5 (512 tokens), 3-axis position ids, a guidance embedding (dev), flow matching."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch

from diffbase.models.families import flux
from diffbase.models.families.record import (
    CLIP_L,
    ControlNetSupport,
    Family,
    FamilySpec,
    TextEncoderSpec,
    TokenLayout,
    t5_length,
)  # fmt: skip

text_length = functools.partial(t5_length, tokenizer="tokenizer_2", default=512)


def encode_prompts(bb: Any, prompts: list[str], image_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    embeds, pooled, text_ids = bb.pipe.encode_prompt(prompts, None, device=bb.device, **text_length(bb.pipe))
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}


def pack(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return bb.pipe._pack_latents(latents, b, c, h, w)


def unpack(bb: Any, tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    h, w = latent_hw
    b, _, ch = tokens.shape
    x = tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def image_ids(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    b, _, h, w = latents.shape
    return bb.pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)


def reference_ids(bb: Any, latents: torch.Tensor, index: int) -> torch.Tensor:
    """FLUX.1 Kontext puts its one reference grid at t = 1."""
    if index:
        raise ValueError("FLUX.1 Kontext takes one reference image")
    ids = image_ids(bb, latents).clone()
    ids[..., 0] = 1
    return ids


def seq_len(bb: Any, latent_hw: tuple[int, int]) -> int:
    return (latent_hw[0] // 2) * (latent_hw[1] // 2)


LAYOUT = TokenLayout(pack, unpack, image_ids, reference_ids)


def controlnet_residuals(bb: Any, controlnet: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                         cond: dict[str, torch.Tensor], control: torch.Tensor, scale: float,
                         guidance: float | None, encode: Any) -> dict[str, Any]:  # fmt: skip
    """FLUX.1's ControlNet takes the control image's normalised latent, packed like the noisy one."""
    inner = getattr(controlnet, "module", controlnet)  # attributes live on the unwrapped model
    control_latents = encode(control).to(latents)
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    blocks, single = controlnet(
        hidden_states=pack(bb, latents), controlnet_cond=pack(bb, control_latents), conditioning_scale=scale,
        timestep=t / 1000, guidance=flux.guidance_input(inner, latents, guidance),
        pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=cond["text_ids"], img_ids=image_ids(bb, latents), return_dict=False,
    )  # fmt: skip
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}


def make_controlnet(denoiser: torch.nn.Module, layers: int | None, single: int | None) -> torch.nn.Module:
    import diffusers

    config = denoiser.config
    return diffusers.FluxControlNetModel.from_transformer(
        denoiser, num_layers=layers or min(4, config.num_layers),
        num_single_layers=single or min(10, config.num_single_layers),
        attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
    )  # fmt: skip


TEXT = (CLIP_L, TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", "t5", "T5Config", "T5EncoderModel", 512))
BASE = FamilySpec(
    name="flux1", family="flux1", pipeline="FluxPipeline", denoiser="transformer",
    denoiser_class="FluxTransformer2DModel", vae_class="AutoencoderKL",
    scheduler_class="FlowMatchEulerDiscreteScheduler", text_encoders=TEXT, prediction="flow",
    variants=("dev", "schnell", "tiny", "tiny-schnell", "toy"),
    pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
)  # fmt: skip
SPECS = (
    BASE,  # the same components under the editing and inpainting pipelines
    replace(BASE, name="flux1-kontext", pipeline="FluxKontextPipeline", variants=("kontext-dev", "tiny-kontext")),
    replace(BASE, name="flux1-fill", pipeline="FluxFillPipeline", variants=("fill-dev", "tiny-fill"),
            pipeline_extras=()),
)  # fmt: skip

FAMILY = Family(
    name="flux1",
    title="FLUX.1",
    specs=SPECS,
    size_multiple=16,
    encode_prompts=encode_prompts,
    denoise=functools.partial(flux.denoise, layout=LAYOUT, pooled=True),
    # diffusers' train_dreambooth_lora_flux.py: attention and the feed-forward layers
    lora_targets=(*flux.JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    lora_markers=flux.LORA_MARKERS,
    text_length=text_length,
    seq_len=seq_len,
    tokens=LAYOUT,
    controlnet=ControlNetSupport(
        "FluxControlNetModel", make_controlnet, "FluxControlNetPipeline", "control_image", controlnet_residuals
    ),  # fmt: skip
    true_cfg=True,
    bfl_layout=True,
    batchless=frozenset({"text_ids"}),
)
