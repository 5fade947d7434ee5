"""DreamO's cost: generation with 1 and 2 references over plain FLUX.1 generation, in the exact mode (the
official computation: the references go through the transformer at every step) and the cached-reference
mode (their keys and values from the first step only), and the cached mode's error against the exact
result with the same seed. Goal for 1 reference, exact: <= 1.6x plain.

On the shipped toy FLUX.1 by default, with the token counts of the official default scaled down (a target of
4x the reference's tokens: 1024x1024 with 512 px references); on a GPU, benchmarks/gpu.py's `dreamo` stage
runs the same measurement on FLUX.1-dev with random bf16 weights.

python benchmarks/dreamo.py [--steps 12] [--repeats 5] [--size 64] [--ref 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TOY = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def references(ref_px: int) -> list[Any]:
    from diffbase.methods.dreamo.mechanism.generate import Reference
    from diffbase.toy.synthetic import Garment, product_shot

    shots = [product_shot(Garment("shirt", "stripes", "green", "white", 0.18), (ref_px, ref_px)),
             product_shot(Garment("dress", "dots", "purple", "white", 0.18), (ref_px, ref_px))]  # fmt: skip
    return [Reference(img, "ip", k + 1) for k, img in enumerate(shots)]


def measure(pipe: Any, emb: Any, hw: tuple[int, int], ref_px: int, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds and median per-round ratios over plain generation (the bare FluxPipeline call, same
    steps, size and seed), rounds interleaved; and the cached mode's mean absolute error (0-1) and PSNR
    against the exact mode."""
    from diffbase.methods.dreamo.mechanism.generate import DreamOSettings, dreamo_generate
    from diffbase.models.backbone import text_length

    device = pipe.transformer.device
    h, w = hw
    refs = references(ref_px)
    settings = DreamOSettings(prompt="[ref#1] and [ref#2] on a table", height=h, width=w, steps=steps, guidance=3.5)

    def plain() -> Image.Image:
        return pipe(prompt=settings.prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(0), **text_length(pipe, "flux1")).images[0]  # fmt: skip

    def variant(n: int, cached: bool) -> Any:
        s = DreamOSettings(**{**settings.__dict__, "cache_references": cached})
        return lambda: dreamo_generate(pipe, emb, refs[:n], s)

    runs = {
        f"{n} ref{'s' if n > 1 else ''}, {mode}": variant(n, mode == "cached")
        for n in (1, 2)
        for mode in ("exact", "cached")
    }
    plain()  # warm-up
    for fn in runs.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in ["plain", *runs]}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        order = list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))
        base = timed(plain, device)
        seconds["plain"].append(base)
        for name, fn in order:
            t = timed(fn, device)
            seconds[name].append(t)
            ratios[name].append(t / base)
    out: dict[str, float] = {f"{name}: s/image": statistics.median(v) for name, v in seconds.items()}
    out |= {f"{name}: over plain": statistics.median(v) for name, v in ratios.items()}
    for n in (1, 2):
        exact = np.asarray(variant(n, False)(), dtype=np.float64) / 255
        cached = np.asarray(variant(n, True)(), dtype=np.float64) / 255
        mse = float(((exact - cached) ** 2).mean())
        out[f"{n} ref{'s' if n > 1 else ''}, cached: mean abs error"] = float(np.abs(exact - cached).mean())
        out[f"{n} ref{'s' if n > 1 else ''}, cached: PSNR dB"] = 10 * np.log10(1 / mse) if mse > 0 else float("inf")
    return out


def main() -> None:
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings
    from diffbase.models.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="sampling steps (the official default with turbo)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="target side in pixels (toy: 256 tokens)")
    ap.add_argument("--ref", type=int, default=32, help="reference side in pixels (toy: 64 tokens)")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe, _ = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    emb = DreamOEmbeddings.for_pipe(pipe)
    torch.nn.init.normal_(emb.task.weight, std=0.02)
    torch.nn.init.normal_(emb.idx.weight, std=0.02)
    results = measure(pipe, emb, (args.size, args.size), args.ref, args.steps, args.repeats)
    print(f"toy FLUX.1, {args.size}x{args.size} target, {args.ref} px references, {args.steps} steps, "
          f"median of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads")  # fmt: skip
    for name, value in results.items():
        print(f"  {name}: {value:.3f}")
    print(f"goal: 1 ref exact <= 1.6x plain: {'PASS' if results['1 ref, exact: over plain'] <= 1.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
