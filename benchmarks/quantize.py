"""What a quantized frozen base costs in quality, on the shipped toy FLUX.1 (a CPU, a few minutes):

1. The README's toy LoRA (configs/experiments/toy/flux1_lora.yaml: the flat shapes of examples/shapes) trained
   in bf16 on the bf16 base and on fp8 / int8 / qint8 bases, same seed and data, a quarter of the shapes held
   out: the held-out loss at fixed noise at the end (goal: within 3% of the bf16 base's).
2. Generation with the toy in bf16 against its fp8 / int8 / qint8 transformer, same prompts and seeds: PSNR
   (goal: int8 >= 30 dB), and a grid of the images (benchmarks/quantize.png).

python benchmarks/quantize.py [--steps 400] [--out benchmarks/quantize.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy"
KINDS = ("none", "fp8", "int8", "qint8")
PROMPTS = ["a person wearing a striped red t-shirt", "a person in a blue dress with dots", "a yellow circle on black"]


def held_out_loss(kind: str, steps: int, work: Path) -> tuple[float, float]:
    """(held-out loss at the end, seconds) of the toy LoRA on a `kind` base."""
    from diffbase.config import load_config
    from diffbase.methods import train

    out = work / kind
    config = load_config(ROOT / "configs" / "experiments" / "toy" / "flux1_lora.yaml", [
        f"experiment.output_dir={out}", f"data.train_path={ROOT / 'examples' / 'shapes'}", "model.dtype=bfloat16",
        "hardware.mixed_precision=bf16", f"model.quantize={kind}", f"training.max_steps={steps}",
        "training.checkpoint_every=0", "training.validation.loss_split=0.25", "training.validation.prompts=[]",
        "training.batch_size=6",  # 8 shapes, 2 held out
    ])  # fmt: skip
    start = time.perf_counter()
    train(config, show_progress=False, overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1], time.perf_counter() - start


def images(pipe: object, spec: object) -> list[object]:
    from diffbase.generate import GenerateSettings, generate

    return [generate(pipe, spec, GenerateSettings(prompt=p, seed=k, steps=20, height=32, width=32))
            for k, p in enumerate(PROMPTS)]  # fmt: skip


def psnr(a: list[object], b: list[object]) -> float:
    """PSNR over all pixels of the image sets (as one batch: torchmetrics' psnr with one data range)."""
    from diffbase.metrics.images import to_tensor
    from diffbase.metrics.scores import psnr as psnr_per_image

    x, y = torch.stack([to_tensor(i) for i in a]), torch.stack([to_tensor(i) for i in b])
    return float(psnr_per_image(x.flatten()[None, None, None], y.flatten()[None, None, None])[0])


def ssim(a: list[object], b: list[object]) -> float:
    """Mean SSIM of each quantized image against its bf16 one (torchmetrics)."""
    from diffbase.metrics.images import to_tensor
    from diffbase.metrics.scores import ssim as ssim_per_image

    x, y = torch.stack([to_tensor(i) for i in a]), torch.stack([to_tensor(i) for i in b])
    return float(ssim_per_image(y, x).mean())


def generation(out: Path) -> dict[str, tuple[float, float]]:
    """(PSNR, SSIM) of each quantized transformer's images against the bf16 ones; the grid written to `out`."""
    from diffbase.grid import image_grid
    from diffbase.models.loading import load_pipeline
    from diffbase.models.quantize import quantize

    pipe, spec = load_pipeline(TOY, dtype="bfloat16")
    full = pipe.transformer
    rows, labels, scores = [], [], {}
    for kind in KINDS:
        pipe.transformer = full if kind == "none" else quantize(copy.deepcopy(full), kind, torch.bfloat16)
        row = images(pipe, spec)
        if kind != "none":
            scores[kind] = (psnr(rows[0], row), ssim(rows[0], row))
        rows.append(row)
        labels.append("bf16" if kind == "none" else f"{kind} ({scores[kind][0]:.1f} dB)")
    image_grid(rows, labels=labels, header=PROMPTS).save(out)
    return scores


def main() -> None:
    import diffbase.methods

    diffbase.methods.load_all()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="LoRA steps (the toy experiment's 400)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quantize.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    scores = generation(args.out)
    with tempfile.TemporaryDirectory(prefix="diffbase-quantize-") as tmp:
        losses = {kind: held_out_loss(kind, args.steps, Path(tmp)) for kind in KINDS}
    base = losses["none"][0]
    print(
        f"toy FLUX.1, {torch.get_num_threads()} threads; LoRA {args.steps} steps, bf16, a quarter of the shapes held out"
    )
    print("| base | held-out loss | over the bf16 base's | goal | train s | generation PSNR vs bf16 | SSIM | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        loss, seconds = losses[kind]
        ratio = loss / base
        lgoal = "" if kind == "none" else ("PASS" if abs(ratio - 1) <= 0.03 else "FAIL") + " (within 3%)"
        gen = "" if kind == "none" else f"{scores[kind][0]:.1f} dB"
        sim = "" if kind == "none" else f"{scores[kind][1]:.4f}"
        good = kind == "int8" and scores[kind][0] >= 30
        ggoal = ("PASS (>= 30 dB)" if good else "FAIL (>= 30 dB)") if kind == "int8" else ""
        name = "bf16" if kind == "none" else kind
        print(f"| {name} | {loss:.4f} | {ratio:.3f} | {lgoal} | {seconds:.0f} | {gen} | {sim} | {ggoal} |")
    print(f"grid: {args.out}")


if __name__ == "__main__":
    main()
