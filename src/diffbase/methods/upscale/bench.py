"""The upscaler's benchmark stage: 1024x1024 -> 2048x2048 (9 fused 1024 px tiles), 20 steps at strength 0.35,
plain and with a DINOv2 ViT-B/14 and its adapter: seconds per image and peak memory."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw

from diffbase.interface.bench import Context, Stage, flux1_pipeline, gib, peak_bytes, reset_peak, timed


@dataclass(frozen=True)
class Sizes:
    source: int  # the input side; the result is twice that
    tile: int
    overlap: int
    steps: int
    dino: tuple[int, int, int]  # width, layers, heads


SIZES = {
    False: Sizes(1024, 1024, 128, 20, (768, 12, 12)),  # ViT-B/14
    True: Sizes(32, 32, 16, 3, (32, 2, 2)),
}


def stage_upscale(ctx: Context) -> None:
    """The tiled upscaler, fused tiles, with and without a DINOv2 ViT-B/14 (random weights) and its adapter."""
    from transformers import Dinov2Config, Dinov2Model

    from diffbase.methods.upscale.mechanism.dino import DinoAdapter
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, upscale
    from diffbase.methods.upscale.mechanism.tiles import tile_grid

    s = SIZES[ctx.tiny]
    pipe, _ = flux1_pipeline(ctx)
    width, layers, heads = s.dino
    with torch.device(ctx.device):
        dino = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                        intermediate_size=4 * width, patch_size=14, image_size=518))  # fmt: skip
        adapter = DinoAdapter(width, pipe.transformer.config.joint_attention_dim)
    dino = dino.to(pipe.transformer.dtype).eval()
    adapter = adapter.to(pipe.transformer.dtype)
    image = Image.new("RGB", (s.source, s.source), (120, 140, 160))
    ImageDraw.Draw(image).ellipse(
        [s.source // 4, s.source // 4, 3 * s.source // 4, 3 * s.source // 4], fill=(230, 60, 40)
    )
    settings = UpscaleSettings(scale=2.0, strength=0.35, steps=s.steps, tile=s.tile, overlap=s.overlap)
    f = pipe.vae_scale_factor
    side = 2 * s.source
    tiles = len(tile_grid(side // f, side // f, s.tile // f, s.overlap // f))
    label = f"{s.source}x{s.source} -> {side}x{side}, {tiles} tiles of {s.tile} px, {s.steps} steps at strength 0.35"
    for name, extra in (("plain", (None, None)), ("DINO ViT-B/14 + adapter", (dino, adapter))):
        ctx.log(f"upscale: {name}")
        upscale(pipe, image.resize((s.source // 2, s.source // 2)), replace(settings, steps=2), *extra)  # warm-up
        reset_peak(ctx.device)
        seconds = timed(lambda extra=extra: upscale(pipe, image, settings, *extra), ctx.device)
        ctx.add("upscale", f"{label}, {name}: s/image", f"{seconds:.2f}")
        ctx.add("upscale", f"{label}, {name}: peak memory", gib(peak_bytes(ctx.device)))


STAGES = (Stage("upscale", stage_upscale, flux1=True),)
