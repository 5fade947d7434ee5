"""Kontext training on the toy FLUX.1 relabelled as a FLUX.1 Kontext folder (diffbase ships no toy Kontext
model): held-out recolour edits before and after training, against "output = source".

    python benchmarks/kontext_learning.py [--steps 1500] [--pairs 400] [--train lora|full]

Writes a held-out grid (source | result | target) and benchmarks/kontext_learning.json. The error is the L1
(0-1) between the pipeline's result (FluxKontextPipeline, 28 steps, the pair's own size) and the target, on
the whole image and inside the garment mask; beside it the paper metrics of diffbase.metrics: SSIM and PSNR
against the targets, and KID over a random-weight DINOv2 (`kid_random_dino`: compares runs with each other,
not with any paper).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def kontext_folder(out: Path) -> Path:
    """The toy FLUX.1 folder, its model_index saying FluxKontextPipeline (the same components)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(TOY, out)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "FluxKontextPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def evaluate(pipe: object, pairs: list[dict], folder: Path, steps: int, guidance: float) -> tuple[dict, list]:
    from diffbase.metrics import features, images, scores

    errors, masked, src_err, src_masked, rows, paired, results, targets = [], [], [], [], [], [], [], []
    for k, e in enumerate(pairs):
        source = Image.open(folder / e["source"]).convert("RGB")
        target = np.asarray(Image.open(folder / e["image"]).convert("RGB"), dtype=np.float64) / 255
        mask = np.asarray(Image.open(folder / e["mask"]).convert("L")) > 127
        w, h = source.size
        with torch.no_grad():
            out = pipe(image=source, prompt=e["caption"], height=h, width=w, num_inference_steps=steps,
                       guidance_scale=guidance, max_area=h * w, _auto_resize=False, max_sequence_length=32,
                       generator=torch.Generator("cpu").manual_seed(k)).images[0]  # fmt: skip
        got, src = np.asarray(out, dtype=np.float64) / 255, np.asarray(source, dtype=np.float64) / 255
        errors.append(np.abs(got - target).mean())
        src_err.append(np.abs(src - target).mean())
        if mask.any():
            masked.append(np.abs(got - target)[mask].mean())
            src_masked.append(np.abs(src - target)[mask].mean())
        rows.append([source, out, Image.fromarray((target * 255).astype(np.uint8))])
        results.append(images.to_tensor(out))
        targets.append(torch.from_numpy(target).permute(2, 0, 1).float())
        paired.append(scores.paired(results[-1], targets[-1]))
    kid = scores.distribution(features.random_dino(), targets, results, "kontext")["kid"]
    return {"l1": float(np.mean(errors)), "masked_l1": float(np.mean(masked)),
            "source_l1": float(np.mean(src_err)), "source_masked_l1": float(np.mean(src_masked)),
            **scores.means(paired), "kid_random_dino": kid}, rows  # fmt: skip


def main() -> None:
    import diffbase.methods as M
    from diffbase.config import configs_dir, load_config
    from diffbase.data.synthetic import write_edit_pairs
    from diffbase.grid import image_grid
    from diffbase.models.loading import load_pipeline

    M.load_all()  # the families and the methods' config sections (training.lora, training.edit)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--train", default="lora", choices=["lora", "full"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()
    work = ROOT / "outputs" / "bench_kontext"
    model = kontext_folder(work / "toy-kontext")
    data = write_edit_pairs(work / "pairs", args.pairs + 24, seed=3, size=(32, 32))
    entries = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    train_file, held = data / "train.jsonl", entries[args.pairs :]
    train_file.write_text("\n".join(json.dumps(e) for e in entries[: args.pairs]) + "\n")
    pipe, _ = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    before, _ = evaluate(pipe, held, data, 28, args.guidance)
    print("step 0:", before, flush=True)
    overrides = [f"model.pretrained_path={model}", f"data.train_path={train_file}", "data.resolution=32",
                 "data.bucket_step=0", "training.method=kontext", f"training.edit.train={args.train}",
                 f"training.max_steps={args.steps}", "training.batch_size=8", f"training.learning_rate={args.lr}",
                 f"training.lora.rank={args.rank}", f"training.lora.alpha={args.rank}",
                 f"training.objective.guidance={args.guidance}", "training.checkpoint_every=100000",
                 "training.validation.loss_split=0", "data.cache_latents=true", "data.cache_text=true",
                 f"experiment.output_dir={work / 'run'}"]  # fmt: skip
    config = load_config(configs_dir() / "experiments" / "toy" / "flux1_lora.yaml", overrides)
    start = time.perf_counter()
    result = M.train(config, show_progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    trained = result.backbone.pipe
    trained.set_progress_bar_config(disable=True)
    after, rows = evaluate(trained, held, data, 28, args.guidance)
    print("trained:", after, flush=True)
    image_grid(rows[:8], header=["source", "result", "target"], cell=96).save(
        ROOT / "benchmarks" / "kontext_learning.png"
    )
    report = {"args": vars(args), "train_seconds": round(seconds, 1), "held_out_pairs": len(held), "step 0": before,
              "trained": after}  # fmt: skip
    (ROOT / "benchmarks" / "kontext_learning.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
