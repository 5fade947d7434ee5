"""Tiled img2img upscaling with FLUX.1, the tiles fused at every step.

1. The image is resized by `scale` (Lanczos) to the exact output size, padded (edge pixels) to a multiple of
   16, VAE-encoded (tiled when large) as FluxImg2ImgPipeline encodes it: a sample of the latent
   distribution, then the noise, both from the seeded generator.
2. Timesteps: FLUX's sigmas shifted for one tile's token count, cut by `strength` as img2img cuts them; the
   latent is noised to the first one.
3. Every step predicts each tile (its own ids from 0, as a native-size image; with DINO, its own features:
   context tokens, or additions to its image tokens aligned to its latent grid) and
   fuses the predictions with the tiles' weights (diffbase.methods.upscale.mechanism.tiles) before one scheduler step on the
   whole latent, so overlaps agree at every step and there are no seams to hide.
4. The latent is decoded (tiled when large) and the padding cut off.

With one tile and no DINO this is FluxImg2ImgPipeline's computation (tested pixel for pixel).
`paste` is the baseline the seam benchmark compares with: each tile sampled on its own from start to end,
then the finished tiles blended with the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffbase import progress
from diffbase.errors import UserError
from diffbase.methods.upscale.mechanism.dino import (
    added_to_image_tokens,
    align_to_latent,
    context_with_dino,
    dino_features,
)
from diffbase.methods.upscale.mechanism.tiles import Tile, fuse, tile_grid
from diffbase.models.placement import execution_device

MAX_OUTPUT_PIXELS = 64 * 2**20  # 8192 x 8192


@dataclass
class UpscaleSettings:
    scale: float = 2.0
    strength: float = 0.35
    steps: int | None = None  # None: 4 for a model without guidance embedding (schnell), 20 otherwise
    guidance: float = 3.5
    seed: int = 0
    prompt: str = ""
    tile: int | None = None  # pixels; None: the model's native resolution (1024 for FLUX.1)
    overlap: int = 128  # pixels
    dino_strength: float = 1.0
    vae_tiling: str = "auto"  # auto (on above 2048x2048), on, off
    max_pixels: int = MAX_OUTPUT_PIXELS


def output_size(size: tuple[int, int], scale: float, max_pixels: int, name: str = "--scale") -> tuple[int, int]:
    """(width, height) of the result: the input's times `scale`, rounded. `name`: the flag or field."""
    if not scale > 0 or not math.isfinite(scale):
        raise UserError(f"{name}: expected a number above 0, got {scale}")
    w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    if w * h > max_pixels:
        raise UserError(f"{name} {scale}: a {w}x{h} result is beyond the limit of {max_pixels} pixels")
    return w, h


def latent_tiles(latent_hw: tuple[int, int], tile: int, overlap: int, factor: int) -> tuple[list[Any], int]:
    """The latent tiles of a (height, width) latent grid for a tile and overlap in pixels, and the overlap
    in latent cells."""
    cells = max(0, overlap // factor)
    return tile_grid(*latent_hw, max(2, tile // factor // 2 * 2), cells), cells


def plan(
    size: tuple[int, int], s: UpscaleSettings, factor: int, native: int, name: str = "--scale"
) -> tuple[tuple[int, int], int]:
    """The result's (width, height) and how many tiles sampling it takes, from sizes alone (before any
    model loads): the padded latent grid upscale() will tile."""
    w, h = output_size(size, s.scale, s.max_pixels, name)
    unit = factor * 2
    latent_hw = (math.ceil(h / unit) * unit // factor, math.ceil(w / unit) * unit // factor)
    return (w, h), len(latent_tiles(latent_hw, s.tile or native, s.overlap, factor)[0])


def native_tile(pipe: Any) -> int:
    """The model's native resolution in pixels: default_sample_size latents x the VAE's factor."""
    return int(pipe.default_sample_size * pipe.vae_scale_factor)


def prepare(pipe: Any, image: Image.Image, s: UpscaleSettings) -> tuple[Image.Image, tuple[int, int]]:
    """The resized image, padded to a multiple of 16 with its edge pixels, and the exact output size."""
    w, h = output_size(image.size, s.scale, s.max_pixels)
    resized = image.convert("RGB").resize((w, h), Image.LANCZOS)
    unit = pipe.vae_scale_factor * 2
    pw, ph = math.ceil(w / unit) * unit, math.ceil(h / unit) * unit
    if (pw, ph) == (w, h):
        return resized, (w, h)
    arr = np.pad(np.asarray(resized), ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    return Image.fromarray(arr), (w, h)


def use_vae_tiling(pipe: Any, setting: str, size: tuple[int, int]) -> None:
    on = setting == "on" or (setting == "auto" and size[0] * size[1] > 2048 * 2048)
    if on:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def strength_timesteps(scheduler: Any, steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """The last `strength` of the schedule, as img2img pipelines cut it (and the scheduler told where it starts)."""
    start = int(max(steps - min(steps * strength, steps), 0)) * scheduler.order
    scheduler.set_begin_index(start)
    return scheduler.timesteps[start:], steps - start // scheduler.order


def check_strengths(s: UpscaleSettings) -> None:
    if not 0 < s.strength <= 1:
        raise UserError(f"--strength: expected a value in (0, 1], got {s.strength}")
    if not 0 <= s.dino_strength <= 1:
        raise UserError(f"--dino-strength: expected a value in [0, 1], got {s.dino_strength}")


def default_steps(pipe: Any) -> int:
    return 20 if pipe.transformer.config.guidance_embeds else 4


@torch.no_grad()
def upscale(
    pipe: Any, image: Image.Image, s: UpscaleSettings, dino: Any = None, adapter: Any = None,
    show_progress: bool | None = None, paste: bool = False,
) -> Image.Image:  # fmt: skip
    from diffusers.utils.torch_utils import randn_tensor

    from diffbase.data.datasets import to_tensor
    from diffbase.generate import decode_flux, flux_guidance, flux_timesteps
    from diffbase.models.backbone import text_length

    check_strengths(s)
    t_model, vae, device = pipe.transformer, pipe.vae, execution_device(pipe)
    padded, (w, h) = prepare(pipe, image, s)
    use_vae_tiling(pipe, s.vae_tiling, padded.size)
    generator = torch.Generator("cpu").manual_seed(s.seed)
    pixels = to_tensor(padded)[None].to(device, vae.dtype)
    z = vae.encode(pixels).latent_dist.sample(generator)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    f = pipe.vae_scale_factor
    tiles, overlap = latent_tiles(tuple(z.shape[-2:]), s.tile or native_tile(pipe), s.overlap, f)

    steps = s.steps or default_steps(pipe)
    seq_len = (tiles[0].h // 2) * (tiles[0].w // 2)

    def schedule() -> tuple[torch.Tensor, int]:  # set (again, for each pasted tile) on the scheduler
        flux_timesteps(pipe, steps, seq_len, device)
        return strength_timesteps(pipe.scheduler, steps, s.strength)

    timesteps, remaining = schedule()
    if remaining < 1:
        raise UserError(f"--strength {s.strength} with --steps {steps} leaves no denoising step")
    noise = randn_tensor(z.shape, generator=generator, device=device, dtype=z.dtype)
    latents = pipe.scheduler.scale_noise(z, timesteps[:1], noise)

    embeds, pooled, text_ids = pipe.encode_prompt(s.prompt, None, device=device, **text_length(pipe, "flux1"))
    guidance = flux_guidance(t_model, s.guidance, device)
    contexts = [tile_context(pipe, t, pixels, embeds, text_ids, dino, adapter, s.dino_strength) for t in tiles]

    bar = progress.bar(desc=f"upscale ({len(tiles)} tiles)", unit="tile-step", total=remaining * len(tiles),
                       show=show_progress)  # fmt: skip
    run = pasted if paste else fused
    latents = run(pipe, latents, tiles, contexts, overlap, timesteps, schedule, (pooled, guidance), bar)
    bar.close()
    return decode_flux(pipe, latents).crop((0, 0, w, h))


def fused(pipe: Any, latents: torch.Tensor, tiles: list[Any], contexts: list[Any], overlap: int,
          timesteps: torch.Tensor, schedule: Any, cond: tuple[Any, Any], bar: Any) -> torch.Tensor:  # fmt: skip
    """Every step: each tile's velocity, fused into one (feathered where tiles overlap), one scheduler step."""
    pooled, guidance = cond
    for step_t in timesteps:
        timestep = step_t.expand(1).to(latents.dtype)
        parts = []
        for t, context in zip(tiles, contexts, strict=True):
            parts.append((t, velocity(pipe, t.cut(latents), timestep, pooled, context, guidance)))
            bar.update(1)
        fused_v = fuse(parts, tuple(latents.shape), overlap).to(latents.dtype)
        latents = pipe.scheduler.step(fused_v, step_t, latents, return_dict=False)[0]
    return latents


def pasted(pipe: Any, latents: torch.Tensor, tiles: list[Any], contexts: list[Any], overlap: int,
           timesteps: torch.Tensor, schedule: Any, cond: tuple[Any, Any], bar: Any) -> torch.Tensor:  # fmt: skip
    """The baseline: every tile sampled on its own (the schedule set again for each), then blended."""
    pooled, guidance = cond
    finished = []
    for t, context in zip(tiles, contexts, strict=True):
        x = t.cut(latents)
        schedule()
        for step_t in timesteps:
            v = velocity(pipe, x, step_t.expand(1).to(x.dtype), pooled, context, guidance)
            x = pipe.scheduler.step(v, step_t, x, return_dict=False)[0]
            bar.update(1)
        finished.append((t, x))
    return fuse(finished, tuple(latents.shape), overlap).to(latents.dtype)


def velocity(
    pipe: Any,
    x: torch.Tensor,
    timestep: torch.Tensor,
    pooled: torch.Tensor,
    context: tuple,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """The transformer's prediction for latents x (B, C, h, w) as a native image of its own (ids from 0),
    with a tile's context (prompt tokens, their ids, the joint attention's extra arguments, and optionally what
    is added to its image tokens after x_embedder: the aligned DINO features)."""
    b, ch, th, tw = x.shape
    f = pipe.vae_scale_factor
    tokens = pipe._pack_latents(x, b, ch, th, tw)
    ids = pipe._prepare_latent_image_ids(b, th // 2, tw // 2, x.device, x.dtype)
    e, e_ids, kwargs = context[:3]
    added = context[3] if len(context) > 3 and context[3] is not None else None
    g = guidance.expand(b) if guidance is not None else None
    with added_to_image_tokens(pipe.transformer, None if added is None else added.expand(b, -1, -1)):
        out = pipe.transformer(hidden_states=tokens, timestep=timestep.expand(b) / 1000, guidance=g,
                               pooled_projections=pooled.expand(b, -1), encoder_hidden_states=e.expand(b, -1, -1),
                               txt_ids=e_ids, img_ids=ids, joint_attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip
    return pipe._unpack_latents(out, th * f, tw * f, f)


def tile_context(
    pipe: Any, t: Tile, pixels: torch.Tensor, embeds: torch.Tensor, text_ids: torch.Tensor, dino: Any, adapter: Any,
    strength: float,
) -> tuple[Any, ...]:  # fmt: skip
    """The tile's context: the prompt's tokens, and when a DINO model and adapter are given and the strength
    is above 0, its DINO features as the adapter injects them: extra context tokens (`tokens`), or additions
    to the tile's image tokens on its latent grid scaled by the strength (`aligned`)."""
    if dino is None or adapter is None or strength == 0:
        return embeds, text_ids, None
    f = pipe.vae_scale_factor
    crop = pixels[..., t.y * f : (t.y + t.h) * f, t.x * f : (t.x + t.w) * f]
    tokens = adapter(dino_features(dino, crop).to(next(adapter.parameters()).dtype))
    if getattr(adapter, "injection", "tokens") == "aligned":
        return embeds, text_ids, None, strength * align_to_latent(tokens, (t.h // 2, t.w // 2))
    return context_with_dino(embeds, text_ids, tokens, strength, (t.h // 2) * (t.w // 2))
