"""DreamO generation: FLUX.1 sampling with reference tokens, as the official pipeline computes it.

Per generation the references are VAE-encoded once, in slot order, each a sample of its latent
distribution (`ref_noise`: "official", `latent_dist.sample()` on PyTorch's global generator as the official
pipeline, which that code never seeds: here it is seeded with `seed` just before, so a run repeats; or
"seeded", the earlier diffbase recipe, a CPU generator seeded `seed + 1`), packed and appended after the
noisy tokens with diagonal ids and the condition embeddings; every step runs them through the transformer
with the current timestep and discards their outputs. Sigmas are linspace(1, 1/steps) shifted by the
target's token count; the first step may use its own guidance.
True CFG (off unless `true_cfg` > 1): on steps in [true_cfg_start, true_cfg_end) a negative branch
without references or condition embeddings, at `neg_guidance`.

`cache_references` (not in the official code): the first step runs as above and records each block's
reference keys and values; later steps run the noisy tokens alone and attend to those. The references
then miss the later timesteps, so the result differs slightly (benchmarks/dreamo.py measures by how much).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from diffbase import progress
from diffbase.methods.dreamo.mechanism.conditions import (
    DreamOEmbeddings,
    ReferenceTokens,
    added_after_x_embedder,
    pack_references,
)
from diffbase.methods.dreamo.mechanism.processor import ReferenceCache, reference_cache
from diffbase.models.placement import execution_device


@dataclass
class DreamOSettings:
    prompt: str
    height: int = 1024
    width: int = 1024
    steps: int = 12  # the app's default with the turbo LoRA
    guidance: float = 4.5  # the app's default for v1.1
    seed: int = 0
    first_step_guidance: float = 0.0  # 0: the same as `guidance`
    true_cfg: float = 1.0
    true_cfg_start: int = 0
    true_cfg_end: int = 0
    negative_prompt: str = ""
    neg_guidance: float = 3.5
    cache_references: bool = False  # the references' keys and values from the first step only (faster, not exact)
    ref_noise: str = "official"  # the references' latent sample: "official" (global RNG) or "seeded" (seed + 1)


REF_NOISE = ("official", "seeded")


@dataclass
class Reference:
    image: Image.Image  # preprocessed (diffbase.methods.dreamo.mechanism.preprocess)
    task: str
    index: int  # 1-based slot


def _pixels(pipe: Any, ref: Reference) -> torch.Tensor:
    from diffbase.data.datasets import to_tensor

    return to_tensor(ref.image.convert("RGB"))[None].to(execution_device(pipe), pipe.vae.dtype)


def _normalised(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def _seeded_sample(pipe: Any, ref: Reference, generator: torch.Generator) -> torch.Tensor:
    """mean + std * noise with the noise from a CPU generator: the same on every device."""
    dist = pipe.vae.encode(_pixels(pipe, ref)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
    return dist.mean + dist.std * noise


def encode_references(pipe: Any, refs: list[Reference], seed: int, ref_noise: str = "official") -> list[torch.Tensor]:
    """Each reference's VAE sample, normalised as FLUX.1's latents, (1, 16, h/8, w/8), drawn by `ref_noise`."""
    if ref_noise not in REF_NOISE:
        raise ValueError(f"ref_noise: expected one of {REF_NOISE}, got '{ref_noise}'")
    if ref_noise == "seeded":
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        return [_normalised(pipe, _seeded_sample(pipe, ref, generator)) for ref in refs]
    device = execution_device(pipe)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG is kept
        torch.manual_seed(seed)
        return [_normalised(pipe, pipe.vae.encode(_pixels(pipe, ref)).latent_dist.sample()) for ref in refs]


def reference_inputs(
    pipe: Any,
    emb: DreamOEmbeddings,
    refs: list[Reference],
    latents: list[torch.Tensor],
    noisy: int,
    target_hw: tuple[int, int],
) -> tuple[ReferenceTokens | None, torch.Tensor]:
    """The references' tokens and ids, and the embeddings to add after x_embedder (noisy + references)."""
    dtype = pipe.transformer.dtype
    if not refs:
        return None, emb.sequence(noisy, [], dtype)
    tokens = pack_references(pipe, [z.to(dtype) for z in latents], [r.index for r in refs], target_hw)
    return tokens, emb.sequence(noisy, list(zip(tokens.counts, tokens.indices, strict=True)), dtype)


@torch.no_grad()
def dreamo_generate(
    pipe: Any, emb: DreamOEmbeddings, refs: list[Reference], settings: DreamOSettings, show_progress: bool | None = None
) -> Image.Image:
    from diffbase.generate import decode_flux, flux_guidance, flux_timesteps
    from diffbase.models.backbone import text_length

    s, transformer = settings, pipe.transformer
    device = execution_device(pipe)
    length = text_length(pipe, "flux1")
    embeds, pooled, text_ids = pipe.encode_prompt(s.prompt, None, device=device, **length)
    latents, ids = pipe.prepare_latents(
        1, transformer.config.in_channels // 4, s.height, s.width, embeds.dtype, device,
        torch.Generator("cpu").manual_seed(s.seed),
    )  # fmt: skip
    noisy = latents.shape[1]
    ref_latents = encode_references(pipe, refs, s.seed, s.ref_noise)
    patch = pipe.vae_scale_factor * 2  # pixels per packed token (16 for FLUX.1)
    target_hw = (s.height // patch, s.width // patch)
    tokens, added = reference_inputs(pipe, emb, refs, ref_latents, noisy, target_hw)
    hidden_refs = tokens.tokens if tokens is not None else latents[:, :0]
    all_ids = torch.cat([ids, tokens.ids.to(ids)]) if tokens is not None else ids
    do_cfg = s.true_cfg > 1
    if do_cfg:
        neg_embeds, neg_pooled, _ = pipe.encode_prompt(s.negative_prompt, None, device=device, **length)
    timesteps = flux_timesteps(pipe, s.steps, noisy, device)

    first = s.first_step_guidance if s.first_step_guidance > 0 else s.guidance
    cached = s.cache_references and tokens is not None
    context = reference_cache(transformer, hidden_refs.shape[1]) if cached else contextlib.nullcontext(ReferenceCache())
    with context as cache:
        for i, t in enumerate(progress.bar(timesteps, "dreamo", show=show_progress)):
            timestep = t.expand(1).to(latents.dtype) / 1000
            reading = cached and i > 0
            cache.mode = "read" if reading else "record" if cached else "off"
            with added_after_x_embedder(transformer, added[:, :noisy] if reading else added):
                pred = transformer(
                    hidden_states=latents if reading else torch.cat([latents, hidden_refs.to(latents)], dim=1),
                    timestep=timestep,
                    guidance=flux_guidance(transformer, first if i == 0 else s.guidance, device),
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=text_ids,
                    img_ids=ids if reading else all_ids,
                    return_dict=False,
                )[0][:, :noisy]
            if do_cfg and s.true_cfg_start <= i < s.true_cfg_end:
                cache.mode = "off"
                neg = transformer(
                    hidden_states=latents,
                    timestep=timestep,
                    guidance=flux_guidance(transformer, s.neg_guidance, device),
                    pooled_projections=neg_pooled,
                    encoder_hidden_states=neg_embeds,
                    txt_ids=text_ids,
                    img_ids=ids,
                    return_dict=False,
                )[0]
                pred = neg + s.true_cfg * (pred - neg)
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
    return decode_flux(pipe, pipe._unpack_latents(latents, s.height, s.width, pipe.vae_scale_factor))
