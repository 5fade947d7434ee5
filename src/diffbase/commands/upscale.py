"""`diffbase upscale`: tiled FLUX.1 img2img upscaling, tiles fused at every step, optionally DINO-guided."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.commands.options import add_runtime_arguments
from diffbase.errors import UserError


def run_upscale(args: argparse.Namespace) -> None:
    from diffbase.commands.options import runtime, use_attention
    from diffbase.data.images import BadFile, image_size, load_image
    from diffbase.io import save_png_atomic
    from diffbase.methods.upscale import UPSCALE
    from diffbase.upscale.sampling import UpscaleSettings, check_strengths, output_size

    settings = UpscaleSettings(
        scale=args.scale, strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
        prompt=args.prompt, tile=args.tile, overlap=args.overlap, dino_strength=args.dino_strength,
        vae_tiling=args.vae_tiling, max_pixels=args.max_pixels,
    )  # fmt: skip
    source = Path(args.input)
    try:
        w, h = image_size(source)
        if w * h > args.max_pixels:
            raise UserError(f"{source}: {w}x{h} is beyond the limit of {args.max_pixels} pixels (--max-pixels)")
        out_w, out_h = output_size((w, h), args.scale, args.max_pixels)  # checked before any model loads
        image = load_image(source)
    except BadFile as err:
        raise UserError(f"{err.path}: {err.reason}") from None
    check_strengths(settings)  # before the model loads
    loaded = UPSCALE.load(args.model, args.dino, args.adapter, **runtime(args))
    use_attention(args, [loaded[0].transformer])
    result = UPSCALE.run(loaded, {"image": image, "progress": True}, settings)
    meta = {"input": str(source), "model": args.model, "dino": args.dino, "adapter": args.adapter,
            "scale": args.scale, "strength": args.strength, "steps": args.steps, "seed": args.seed,
            "dino_strength": args.dino_strength, "size": [out_h, out_w]}  # fmt: skip
    save_png_atomic(result, Path(args.output), meta)
    print(f"wrote {args.output} ({out_w}x{out_h})")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "upscale",
        help="tiled FLUX.1 upscaling, tiles fused at every step, optionally guided by DINOv2 features",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="the image to upscale")
    p.add_argument("output", help="the result (PNG)")
    p.add_argument("--model", required=True, help="a local FLUX.1 (dev or schnell) diffusers folder")
    p.add_argument("--dino", help="a local DINOv2 folder (with --adapter)")
    p.add_argument("--adapter", help="a DINO adapter trained by `diffbase train` (training.method: upscale_dino)")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=0.35, help="img2img strength (0, 1]")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--dino-strength", type=float, default=1.0, help="0: plain img2img, 1: full DINO attention")
    p.add_argument("--prompt", default="", help="what the image shows (optional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: the model's native size)")
    p.add_argument("--overlap", type=int, default=128, help="tile overlap in pixels")
    p.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"], help="auto: on above 2048x2048")
    p.add_argument("--max-pixels", type=int, default=64 * 2**20, help="refuse inputs and results larger than this")
    add_runtime_arguments(p)
    p.set_defaults(func=run_upscale)
