"""DreamO's benchmark stage: generation with 1 and 2 references over plain FLUX.1, the exact and the
cached-reference modes, and the cached mode's error (goal: 1 reference, exact, <= 1.6x plain)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffbase.interface.bench import Context, Stage, flux1_pipeline, timed


@dataclass(frozen=True)
class Sizes:
    hw: tuple[int, int]
    ref: int
    steps: int
    repeats: int


SIZES = {
    False: Sizes((1024, 1024), 512, 12, 2),  # the official app's default: 12 steps, 512 px references
    True: Sizes((64, 64), 32, 2, 1),
}


def references(ref_px: int) -> list[Any]:
    from diffbase.data.synthetic import Garment, product_shot
    from diffbase.methods.dreamo.mechanism.generate import Reference

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


def stage_dreamo(ctx: Context) -> None:
    """DreamO with 1 and 2 references over plain FLUX.1 (benchmarks/dreamo.py's measurement), exact and cached."""
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings

    s = SIZES[ctx.tiny]
    pipe, _ = flux1_pipeline(ctx)
    emb = DreamOEmbeddings.for_pipe(pipe)
    torch.nn.init.normal_(emb.task.weight, std=0.02)
    torch.nn.init.normal_(emb.idx.weight, std=0.02)
    emb = emb.to(ctx.device, pipe.transformer.dtype)
    ctx.log("dreamo: timing plain, 1 and 2 references, exact and cached")
    results = measure(pipe, emb, s.hw, s.ref, s.steps, s.repeats)
    h, w = s.hw
    label = f"{h}x{w}, {s.ref} px references, {s.steps} steps"
    for name, value in results.items():
        ctx.add("dreamo", f"{label}: {name}", f"{value:.3f}")
    ctx.metrics["dreamo_ratio"] = results["1 ref, exact: over plain"]


STAGES = (
    Stage("dreamo", stage_dreamo, flux1=True,
          ratios=(("DreamO generation, 1 reference, exact mode / plain FLUX.1 generation", "dreamo_ratio", 1.6),)),
)  # fmt: skip
