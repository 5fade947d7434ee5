"""FLUX.2 (dev with Mistral 3, klein with Qwen3; klein inpainting is a row of it): latents patchified 2x2
(128 channels, H/16) and normalised by the VAE's BatchNorm statistics, 4-axis position ids, references at
t = 10, 20, ..., flow matching."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch

from diffbase.models.families import flux
from diffbase.models.families.record import Family, FamilySpec, TextEncoderSpec, TokenLayout

KLEIN_INPAINT = "Flux2KleinInpaintPipeline"


def encode_prompts(bb: Any, prompts: list[str], image_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    embeds, text_ids = bb.pipe.encode_prompt(prompts, device=bb.device)
    return {"prompt_embeds": embeds, "text_ids": text_ids}


def vae_stats(bb: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bn = bb.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(like)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bb.vae.config.batch_norm_eps).to(like)
    return mean, std


def normalize(bb: Any, z: torch.Tensor) -> torch.Tensor:
    z = bb.pipe._patchify_latents(z)
    mean, std = vae_stats(bb, z)
    return (z - mean) / std


def denormalize(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    mean, std = vae_stats(bb, latents)
    return bb.pipe._unpatchify_latents(latents * std + mean)


def pack(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    return bb.pipe._pack_latents(latents)


def unpack(bb: Any, tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    h, w = latent_hw
    b, _, ch = tokens.shape
    return tokens.view(b, h, w, ch).permute(0, 3, 1, 2)


def image_ids(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    return bb.pipe._prepare_latent_ids(latents).to(latents.device)


def reference_ids(bb: Any, latents: torch.Tensor, index: int) -> torch.Tensor:
    """Reference i at t = 10 + 10 * i: the pipeline's `_prepare_image_ids` with scale 10."""
    count = latents.shape[-2] * latents.shape[-1]
    if bb.spec.pipeline == KLEIN_INPAINT:  # its helper takes batched latents and a batch size
        ids = bb.pipe._prepare_image_ids([latents[:1]] * (index + 1), 1, scale=10)[..., -count:, :]
    else:
        ids = bb.pipe._prepare_image_ids([latents[0]] * (index + 1), scale=10)[..., -count:, :]  # (1, N, 4)
    return ids.expand(latents.shape[0], -1, -1).to(latents.device)


LAYOUT = TokenLayout(pack, unpack, image_ids, reference_ids)
MISTRAL = TextEncoderSpec("text_encoder", "tokenizer", "mistral3", "mistral", "Mistral3Config",
                          "Mistral3ForConditionalGeneration", 512)  # fmt: skip
QWEN3 = TextEncoderSpec("text_encoder", "tokenizer", "qwen3", "qwen", "Qwen3Config", "Qwen3ForCausalLM", 512)
DEV = FamilySpec(
    name="flux2", family="flux2", pipeline="Flux2Pipeline", denoiser="transformer",
    denoiser_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2",
    scheduler_class="FlowMatchEulerDiscreteScheduler", text_encoders=(MISTRAL,), prediction="flow",
    variants=("dev", "tiny"),
)  # fmt: skip
KLEIN = replace(DEV, name="flux2-klein", pipeline="Flux2KleinPipeline", text_encoders=(QWEN3,),
                variants=("klein-4b", "klein-9b", "tiny-klein"))  # fmt: skip
SPECS = (
    DEV,
    KLEIN,
    replace(KLEIN, name="flux2-klein-inpaint", pipeline=KLEIN_INPAINT,
            variants=("klein-4b-inpaint", "tiny-klein-inpaint")),
)  # fmt: skip

FAMILY = Family(
    name="flux2",
    title="FLUX.2",
    specs=SPECS,
    size_multiple=16,
    encode_prompts=encode_prompts,
    denoise=functools.partial(flux.denoise, layout=LAYOUT),
    # FLUX.1's set, plus the fused single-block projections
    lora_targets=(
        *flux.JOINT,
        "to_qkv_mlp_proj",
        "attn.to_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
    ),  # fmt: skip
    lora_markers=flux.LORA_MARKERS,
    normalize=normalize,
    denormalize=denormalize,
    tokens=LAYOUT,
    negative_prompt=False,
)
