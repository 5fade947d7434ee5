"""`diffbase parity`: a tiny model of every family, built locally, generating the same prompts
through diffbase, checked pixel for pixel against the bare diffusers pipeline."""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np

from diffbase.io import save_png_atomic, write_json_atomic, write_text_atomic

FAMILIES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "flux2-klein"]
PROMPTS = ["a photo of a cat", "a woman wearing a red striped shirt", "a blue dress"]


def run_parity(out: Path, size: int = 64, steps: int = 4) -> dict:
    import torch
    from tqdm import tqdm

    from diffbase.generate import GenerateSettings, generate
    from diffbase.grid import image_grid
    from diffbase.models.loading import load_pipeline
    from diffbase.models.zoo import write_tiny

    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    bar = tqdm(FAMILIES, desc="parity", unit="family")
    for family in bar:
        bar.set_postfix_str(family)
        folder = out / "zoo" / family
        if not (folder / "model_index.json").exists():
            write_tiny(family, folder)
        pipe, spec = load_pipeline(folder)
        images, max_diff, start = [], 0, time.perf_counter()
        for seed, prompt in enumerate(PROMPTS):
            settings = GenerateSettings(prompt=prompt, seed=seed, steps=steps, height=size, width=size)
            image = generate(pipe, spec, settings)
            bare = pipe(
                prompt=prompt,
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            max_diff = max(max_diff, int(np.abs(np.asarray(image, np.int16) - np.asarray(bare, np.int16)).max()))
            images.append(image)
            save_png_atomic(image, out / "images" / f"{family}_{seed}.png", {"prompt": prompt, "seed": seed})
        rows.append(images)
        results[family] = {
            "pipeline": spec.pipeline,
            "seconds": round(time.perf_counter() - start, 2),
            "max_pixel_diff_vs_diffusers": max_diff,
        }
    grid = image_grid(rows, labels=FAMILIES, header=PROMPTS)
    save_png_atomic(grid, out / "grid.png")
    write_json_atomic(out / "metrics.json", results)
    rows_html = "".join(
        f"<tr><td>{f}</td><td>{html.escape(r['pipeline'])}</td><td>{r['seconds']}</td>"
        f"<td>{r['max_pixel_diff_vs_diffusers']}</td></tr>"
        for f, r in results.items()
    )
    write_text_atomic(
        out / "index.html",
        (
            "<html><body><h1>diffbase parity: tiny models of every family</h1>"
            "<p>Random-weight tiny models built locally; the images are noise-like by design. "
            "The last column shows that diffbase and the bare diffusers pipeline agree pixel for pixel.</p>"
            f"<img src='grid.png'><table border=1><tr><th>family</th><th>pipeline</th><th>s</th>"
            f"<th>max pixel diff</th></tr>{rows_html}</table></body></html>"
        ),
    )
    print(f"\n{'family':<12} {'pipeline':<26} {'seconds':>8} {'max diff vs diffusers':>22}")
    for family, r in results.items():
        print(f"{family:<12} {r['pipeline']:<26} {r['seconds']:>8} {r['max_pixel_diff_vs_diffusers']:>22}")
    print(f"\nwrote {out / 'grid.png'}, {out / 'index.html'}, {out / 'metrics.json'}")
    return results
