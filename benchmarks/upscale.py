"""The tiled upscaler on the shipped toy FLUX.1 (32 px native tiles):

- seams: the gradient energy along the tiles' borders over the image's mean (1.0: no seam), for tiles
  fused at every step against each tile sampled on its own and then blended with the same weights
  (per-tile pasting, as Ultimate SD Upscale does), on the same input, seed and settings;
- cost as the image grows 4x at a time: tiles, seconds (and seconds per tile-step), and the process's peak
  resident memory (CPU; benchmarks/gpu.py's `upscale` stage measures GPU memory at 2048x2048).

python benchmarks/upscale.py [--steps 20] [--strength 0.5]
Writes benchmarks/upscale_seams.png (input | fused | pasted, and the border lines).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def seam_ratio(image: Image.Image, borders_x: list[int], borders_y: list[int]) -> float:
    """Mean absolute gradient across the border lines over the mean absolute gradient everywhere."""
    a = np.asarray(image.convert("L"), dtype=np.float64)
    gx, gy = np.abs(np.diff(a, axis=1)), np.abs(np.diff(a, axis=0))
    on_x = [gx[:, x - 1] for x in borders_x if 0 < x < a.shape[1]]
    on_y = [gy[y - 1, :] for y in borders_y if 0 < y < a.shape[0]]
    border = np.concatenate(on_x + on_y).mean()
    return float(border / ((gx.mean() + gy.mean()) / 2))


def borders(pipe: object, size: tuple[int, int], tile_px: int, overlap_px: int) -> tuple[list[int], list[int]]:
    from diffbase.methods.upscale.mechanism.tiles import tile_grid

    f = pipe.vae_scale_factor
    w, h = size
    tiles = tile_grid(h // f, w // f, tile_px // f, overlap_px // f)
    xs = sorted({e * f for t in tiles for e in (t.x, t.x + t.w)} - {0, w})
    ys = sorted({e * f for t in tiles for e in (t.y, t.y + t.h)} - {0, h})
    return xs, ys


def source_image() -> Image.Image:
    """The input: two synthetic people side by side, 128x64."""
    from diffbase.data.synthetic import make_item

    source = Image.new("RGB", (128, 64))
    for i in range(2):
        source.paste(make_item(0, "test", i, (64, 64)).person, (64 * i, 0))
    return source


def main() -> None:
    from diffbase.data.synthetic import make_item
    from diffbase.grid import side_by_side
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, upscale
    from diffbase.models.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.5)
    args = ap.parse_args()
    pipe, _ = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    source, person = source_image(), make_item(0, "test", 0, (64, 64)).person  # the first person of the source
    s = UpscaleSettings(scale=2.0, strength=args.strength, steps=args.steps, seed=0, tile=32, overlap=8)
    hard = UpscaleSettings(**{**s.__dict__, "overlap": 0})
    fused = upscale(pipe, source, s)
    pasted = upscale(pipe, source, s, paste=True)
    butted = upscale(pipe, source, hard, paste=True)
    xs, ys = borders(pipe, fused.size, 32, 8)
    hx, hy = borders(pipe, fused.size, 32, 0)
    plain = source.resize(fused.size, Image.LANCZOS)
    print(f"seams, toy FLUX.1, {source.size[0]}x{source.size[1]} -> {fused.size[0]}x{fused.size[1]}, 32 px tiles, "
          f"{args.steps} steps, strength {args.strength}; border gradient / mean gradient (1.0: no seam):")  # fmt: skip
    rows = (("Lanczos resize (no tiles), at the 8 px-overlap borders", plain, xs, ys),
            ("fused at every step, 8 px overlap", fused, xs, ys),
            ("per-tile pasting, 8 px overlap, feathered", pasted, xs, ys),
            ("per-tile pasting, no overlap", butted, hx, hy),
            ("Lanczos resize (no tiles), at the no-overlap borders", plain, hx, hy))  # fmt: skip
    for name, img, bx, by in rows:
        print(f"  {name}: {seam_ratio(img, bx, by):.3f}")
    marked = pasted.copy()
    for x in xs:
        for y in range(marked.height):
            marked.putpixel((x, y), (255, 0, 0))
    side_by_side(
        {
            "input (Lanczos x2)": plain,
            "fused": fused,
            "pasted": pasted,
            "pasted, borders": marked,
            "pasted, no overlap": butted,
        }
    ).save(ROOT / "benchmarks" / "upscale_seams.png")
    print("cost as the image grows 4x (one run each, after a warm-up):")
    upscale(pipe, person.resize((16, 16)), UpscaleSettings(scale=2.0, steps=4, tile=32, overlap=8))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for side in (32, 64, 128):
        image = person.resize((side, side), Image.LANCZOS)
        settings = UpscaleSettings(scale=2.0, strength=args.strength, steps=args.steps, tile=32, overlap=8)
        start = time.perf_counter()
        upscale(pipe, image, settings)
        seconds = time.perf_counter() - start
        from diffbase.methods.upscale.mechanism.tiles import tile_grid

        f = pipe.vae_scale_factor
        tiles = len(tile_grid(2 * side // f, 2 * side // f, 32 // f, 8 // f))
        steps = max(1, round(args.steps * args.strength))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  {side}x{side} -> {2 * side}x{2 * side}: {tiles} tiles, {seconds:.2f} s, "
              f"{1000 * seconds / (tiles * steps):.1f} ms per tile-step, peak RSS {peak:.0f} MiB (+{peak - base:.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
