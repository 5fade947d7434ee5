"""What a family is: its spec rows (which diffusers and transformers classes make it: data, read by the builders
and loaders) and its behaviour (how prompts are encoded, latents normalised and laid out, the denoiser
called, which layers LoRA adapts, its ControlNet). Each family module (sd15.py, ..., flux2.py) makes one
`Family`; nothing outside this package compares family names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # pipeline attribute: text_encoder, text_encoder_2, ...
    tokenizer: str  # pipeline attribute of its tokenizer
    key: str  # key under `model.text_encoders` in the YAML config
    tokenizer_kind: str  # which tiny tokenizer stands in for it (models.tokenizers)
    config_class: str  # transformers config class
    model_class: str  # transformers model class
    max_length: int


@dataclass(frozen=True)
class FamilySpec:
    name: str  # family.variant-group name, e.g. "flux2-klein"
    family: str  # config `model.family`
    pipeline: str  # diffusers pipeline class
    denoiser: str  # "unet" or "transformer"
    denoiser_class: str
    vae_class: str
    scheduler_class: str
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: str  # training target: "epsilon" or "flow"
    variants: tuple[str, ...]
    # Extra pipeline constructor arguments that are not modules.
    pipeline_extras: tuple[tuple[str, object], ...] = ()


CLIP_L = TextEncoderSpec("text_encoder", "tokenizer", "clip_l", "clip", "CLIPTextConfig", "CLIPTextModel", 77)
CLIP_G = TextEncoderSpec(
    "text_encoder_2", "tokenizer_2", "clip_g", "clip", "CLIPTextConfig", "CLIPTextModelWithProjection", 77
)


def t5_length(pipe: Any, tokenizer: str, default: int) -> dict[str, int]:
    """A T5 sequence length below the pipeline's default, when the saved tokenizer says so (toy models);
    otherwise nothing, so the pipeline's own default applies."""
    length = getattr(getattr(pipe, tokenizer, None), "model_max_length", None)
    return {"max_sequence_length": int(length)} if length is not None and length < default else {}


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer family lays latents out as tokens (FLUX): (B, C, H, W) <-> (B, tokens, channels),
    the tokens' position ids, a reference image's ids, and the token count of a latent grid."""

    pack: Callable[[Any, torch.Tensor], torch.Tensor]  # (bb, latents)
    unpack: Callable[[Any, torch.Tensor, tuple[int, int]], torch.Tensor]  # (bb, tokens, latent_hw)
    image_ids: Callable[[Any, torch.Tensor], torch.Tensor]  # (bb, latents)
    reference_ids: Callable[[Any, torch.Tensor, int], torch.Tensor]  # (bb, latents, index)


@dataclass(frozen=True)
class ControlNetSupport:
    """A family's ControlNet: the diffusers model class (`from_pretrained`), how one is made from the denoiser,
    its validation pipeline and that pipeline's control-image argument, and the residuals of one call."""

    model_class: str
    make: Callable[[torch.nn.Module, int | None, int | None], torch.nn.Module]  # (denoiser, layers, single layers)
    pipeline: str
    image_arg: str
    # (bb, controlnet, latents, timesteps, cond, control image in [-1, 1], scale, guidance, encode: its latent)
    residuals: Callable[..., dict[str, Any]]


def scale_shift(bb: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the denoiser's space with the VAE's scaling (and shift) factor."""
    shift = bb.vae.config.get("shift_factor") or 0.0
    return (z - shift) * bb.vae.config.scaling_factor


def unscale_shift(bb: Any, latents: torch.Tensor) -> torch.Tensor:
    return latents / bb.vae.config.scaling_factor + (bb.vae.config.get("shift_factor") or 0.0)


def whole_grid(bb: Any, latent_hw: tuple[int, int]) -> int:
    h, w = latent_hw
    return h * w


@dataclass(frozen=True)
class Family:
    name: str  # the config's `model.family`
    title: str  # how people name it: "FLUX.1"
    specs: tuple[FamilySpec, ...]  # its pipelines and variants (the first is the default)
    size_multiple: int  # image sides: the VAE's 8 px, x2 where the transformer takes 2x2 patches
    encode_prompts: Callable[[Any, list[str], tuple[int, int] | None], dict[str, torch.Tensor]]  # (bb, prompts, hw)
    denoise: Callable[..., torch.Tensor]  # (bb, call, latents, timesteps, cond, guidance, conditioning, extra)
    lora_targets: tuple[str, ...]  # suffixes of the Linear layers LoRA adapts by default
    lora_markers: tuple[str, ...]  # key fragments that tell a LoRA file is for this kind of denoiser
    text_length: Callable[[Any], dict[str, int]] = lambda pipe: {}  # the T5 length argument of encode_prompt
    normalize: Callable[[Any, torch.Tensor], torch.Tensor] = scale_shift  # (bb, raw VAE latents)
    denormalize: Callable[[Any, torch.Tensor], torch.Tensor] = unscale_shift  # (bb, latents) -> raw
    seq_len: Callable[[Any, tuple[int, int]], int] = whole_grid  # image tokens of a latent grid (the shift's input)
    tokens: TokenLayout | None = None
    controlnet: ControlNetSupport | None = None
    negative_prompt: bool = True  # its pipeline takes `negative_prompt`
    true_cfg: bool = False  # its pipeline takes `true_cfg_scale` (and then needs a negative prompt)
    bfl_layout: bool = False  # its single files and kohya LoRAs use BFL's fused layout (FLUX.1): converted on load
    batchless: frozenset[str] = frozenset()  # conditioning entries without a batch dimension (FLUX.1 text ids)
    size_conditioning: Callable[[Any, tuple[int, int], int], dict[str, torch.Tensor]] | None = None  # SDXL
