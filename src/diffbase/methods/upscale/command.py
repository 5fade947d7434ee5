"""`diffbase upscale`: tiled FLUX.1 img2img upscaling, tiles fused at every step, optionally DINO-guided."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.interface import checks
from diffbase.interface.options import LPIPS_HELP, HelpFormatter, add_runtime_arguments, eval_subparsers


def check(args: argparse.Namespace) -> tuple[Any, Any, tuple[int, int]]:
    """Every number, the input, the output path and the tiles it will take, before the model loads."""
    from diffbase.methods.upscale.mechanism.sampling import plan

    out = args.out or args.output
    if out is None:
        raise UserError("--out: give the file to write the result to")
    if args.out and args.output:
        raise UserError("--out: given twice (as --out and as the second argument)")
    settings, factor, native, tile = sampling_settings(args)
    image = checks.image(args.input, "input", max_pixels=args.max_pixels, max_aspect=None)
    checks.output(out, "--out", [args.input], args.overwrite)
    (w, h), tiles = plan(image.size, settings, factor, native)
    if tiles > args.max_tiles:
        raise UserError(f"--max-tiles: a {w}x{h} result takes {tiles} tiles of {tile} px, more than {args.max_tiles}; "
                        "lower --scale, raise --tile, or raise --max-tiles")  # fmt: skip
    steps = args.steps if args.steps is not None else "20 (dev) or 4 (schnell)"
    print(f"upscale: {image.size[0]}x{image.size[1]} -> {w}x{h}, {tiles} tile(s) of {tile} px x {steps} steps "
          f"x strength {args.strength}")  # fmt: skip
    return settings, image, (w, h)


def sampling_settings(args: argparse.Namespace) -> tuple[Any, int, int, int]:
    """(settings, VAE factor, native tile, tile) from the sampling options, every number checked before loading."""
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings
    from diffbase.methods.upscale.method import vae_factor

    checks.runtime(args)
    if args.steps is not None:
        checks.count(args.steps, "--steps")
    checks.number(args.scale, "--scale", low=0, low_open=True)
    checks.number(args.strength, "--strength", 0, 1, low_open=True)
    checks.number(args.dino_strength, "--dino-strength", 0, 1)
    checks.number(args.guidance, "--guidance", low=0)
    checks.count(args.max_pixels, "--max-pixels")
    checks.count(args.max_tiles, "--max-tiles")
    if bool(args.dino) != bool(args.adapter):
        raise UserError("--dino and --adapter: give both (the adapter is trained for one DINO model) or neither")
    checks.model_folder(args.model, family="flux1", job="the upscaler")
    factor = vae_factor(args.model)
    native = 128 * factor  # FluxPipeline's default_sample_size (128 latents) in pixels
    unit = 2 * factor  # one packed token: 16 px on FLUX.1
    if args.tile is not None and (args.tile < 2 * unit or args.tile % unit):
        raise UserError(f"--tile: expected a multiple of {unit} px of at least {2 * unit}, got {args.tile}")
    tile = args.tile or native
    if args.overlap is None:
        args.overlap = tile // 8
    if not 0 <= args.overlap < tile // 2:
        raise UserError(f"--overlap: expected 0 <= overlap < half the tile ({tile // 2} px), got {args.overlap}")
    settings = UpscaleSettings(
        scale=args.scale, strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
        prompt=args.prompt, tile=args.tile, overlap=args.overlap, dino_strength=args.dino_strength,
        vae_tiling=args.vae_tiling, max_pixels=args.max_pixels,
    )  # fmt: skip
    return settings, factor, native, tile


def run_upscale(args: argparse.Namespace) -> None:
    from diffbase.io import save_image_atomic
    from diffbase.methods.upscale.method import UPSCALE

    settings, image, (out_w, out_h) = check(args)
    loaded = UPSCALE.load(args.model, args.dino, args.adapter, **args.runtime.loader())
    args.runtime.use([loaded[0].transformer])
    result = UPSCALE.run(loaded, {"image": image}, settings)
    meta = {"input": str(args.input), "model": args.model, "dino": args.dino, "adapter": args.adapter,
            "scale": args.scale, "strength": args.strength, "steps": args.steps, "seed": args.seed,
            "dino_strength": args.dino_strength, "size": [out_h, out_w]}  # fmt: skip
    out = args.out or args.output
    save_image_atomic(result, Path(out), meta)
    print(f"wrote {out} ({out_w}x{out_h})")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "upscale",
        help="tiled FLUX.1 upscaling, tiles fused at every step, optionally guided by DINOv2 features",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="the image to upscale")
    p.add_argument("output", nargs="?", help="the result (the same as --out, kept for earlier scripts)")
    p.add_argument("--out", help="the result: .png (with its settings), .jpg or .webp")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    add_sampling_arguments(p)
    p.set_defaults(func=run_upscale)
    e = eval_subparsers(sub).add_parser(
        "upscale", help="PSNR and SSIM of the upscaler against high-resolution originals it sees downscaled "
        "(bicubic), beside plain bicubic upscaling", formatter_class=HelpFormatter)  # fmt: skip
    e.add_argument("--originals", required=True, help="folder of high-resolution images")
    e.add_argument("--out", default="outputs/eval_upscale", help="folder for metrics.json and grid.png")
    e.add_argument("--lpips", help=LPIPS_HELP)
    add_sampling_arguments(e)
    e.set_defaults(func=run_eval)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The model and sampling options `upscale` and `eval upscale` share."""
    p.add_argument("--model", required=True, help="a local FLUX.1 (dev or schnell) diffusers folder")
    p.add_argument("--dino", help="a local DINOv2 folder (with --adapter)")
    p.add_argument("--adapter", help="a DINO adapter trained by `diffbase train` (training.method: upscale)")
    p.add_argument("--scale", type=float, default=2.0, help="the result's size over the input's")
    p.add_argument("--strength", type=float, default=0.35, help="img2img strength (0, 1]")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance value")
    p.add_argument("--dino-strength", type=float, default=1.0, help="0: plain img2img, 1: full DINO attention")
    p.add_argument("--prompt", default="", help="what the image shows (optional)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: the model's native size)")
    p.add_argument("--overlap", type=int, help="tile overlap in pixels (default: an eighth of the tile, 128 for 1024)")
    p.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"], help="auto: on above 2048x2048")
    p.add_argument("--max-pixels", type=int, default=64 * 2**20, help="refuse inputs and results larger than this")
    p.add_argument("--max-tiles", type=int, default=100, help="refuse results that take more tiles than this")
    add_runtime_arguments(p)


def run_eval(args: argparse.Namespace) -> None:
    """Each original downscaled by --scale (bicubic, the usual super-resolution protocol), upscaled back, and
    compared with the original; plain bicubic upscaling of the same input is the baseline row."""
    from PIL import Image

    from diffbase.data.images import load_image
    from diffbase.grid import image_grid
    from diffbase.io import save_png_atomic, writable_folder, write_json_atomic
    from diffbase.methods.upscale.method import UPSCALE
    from diffbase.metrics import images, scores

    settings, *_ = sampling_settings(args)
    files = images.image_files(args.originals, "--originals")
    for file in files:  # each readable before the model loads (read again one at a time below)
        checks.image(str(file), "--originals", args.max_pixels, max_aspect=None)
    folder = writable_folder(args.out, "--out")
    lpips = None
    if args.lpips:
        from diffbase.metrics.lpips import model

        lpips = model(args.lpips, "--lpips")
    loaded = UPSCALE.load(args.model, args.dino, args.adapter, **args.runtime.loader())
    args.runtime.use([loaded[0].transformer])  # as `upscale` does: --attention's kernels, --compile's blocks
    found: dict[str, list[dict[str, float]]] = {"upscaler": [], "bicubic": []}
    rows = []
    for file in files:
        original = load_image(file)
        w, h = original.size
        small = original.resize((max(1, round(w / args.scale)), max(1, round(h / args.scale))), Image.BICUBIC)
        result = UPSCALE.run(loaded, {"image": small}, settings).resize((w, h), Image.BICUBIC)
        bicubic = small.resize((w, h), Image.BICUBIC)
        truth = images.to_tensor(original)
        for name, image in (("upscaler", result), ("bicubic", bicubic)):
            found[name].append(scores.paired(images.to_tensor(image), truth, lpips))
        rows.append([bicubic, result, original])
    report = {"images": len(files), "scale": args.scale}
    report |= {f"{name}_{k}": v for name, per_image in found.items() for k, v in scores.means(per_image).items()}
    save_png_atomic(image_grid(rows[:8], header=["bicubic", "upscaler", "original"]), folder / "grid.png")
    write_json_atomic(folder / "metrics.json", report)
    for key, value in report.items():
        print(f"  {key:<16} {value:.4f}" if isinstance(value, float) else f"  {key:<16} {value}")
    print(f"wrote {folder / 'grid.png'} and {folder / 'metrics.json'}")
