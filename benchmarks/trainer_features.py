"""Which trainer features help, on the README's toy FLUX.1 LoRA task (a CPU, about 6 minutes):
the held-out loss after the same steps for AdamW / Prodigy / Lion, LoRA / DoRA / LoKr and EMA on / off.

Every run is configs/experiments/toy/flux1_lora.yaml (400 steps, rank 16, the flat shapes of examples/shapes)
with a quarter of the shapes held out (batch 6 of the other 6), the same seed, data and noise, and one change;
the held-out loss is measured at fixed noise levels every 50 steps. Writes a table (stdout, for RESULTS.md),
benchmarks/trainer_features.json and a plot of the held-out loss by step (benchmarks/trainer_features.png).

python benchmarks/trainer_features.py [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (what changes, the overrides); each optimizer at the lr its authors advise relative to AdamW's 5e-3
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "adamw lora": ("the toy experiment as shipped (AdamW, lr 5e-3)", []),
    "prodigy lora": ("Prodigy, lr 1.0 (it finds the step size)", ["training.optimizer.type=prodigy",
                                                                   "training.learning_rate=1.0"]),
    "lion lora": ("Lion, lr 5e-4 (Lion's authors: 3-10x below AdamW's)", ["training.optimizer.type=lion",
                                                                         "training.learning_rate=5e-4"]),
    "adamw dora": ("DoRA (peft use_dora)", ["training.lora.type=dora"]),
    "adamw lokr": ("LoKr (peft, rank 16, factor -1)", ["training.lora.type=lokr"]),
    "adamw lora ema": ("EMA on, decay 0.99 (0.9999 would barely move in 400 steps)",
                       ["training.ema.enabled=true", "training.ema.decay=0.99"]),
}  # fmt: skip


def run(name: str, overrides: list[str], steps: int, work: Path) -> dict:
    from diffbase.config import load_config
    from diffbase.methods import train

    out = work / name.replace(" ", "_")
    config = load_config(ROOT / "configs" / "experiments" / "toy" / "flux1_lora.yaml", [
        f"experiment.output_dir={out}", f"data.train_path={ROOT / 'examples' / 'shapes'}",
        f"training.max_steps={steps}", "training.checkpoint_every=0", "training.validation.loss_split=0.25",
        "training.validation.prompts=[]", "training.validation.every=50", "training.batch_size=6", *overrides,
    ])  # fmt: skip
    start = time.perf_counter()
    train(config, show_progress=False, overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train_loss = [r["loss"] for r in rows if "loss" in r]
    return {"curve": curve, "final": curve[-1][1], "best": min(v for _, v in curve), "seconds":
            time.perf_counter() - start, "train_last50": sum(train_loss[-50:]) / len(train_loss[-50:])}  # fmt: skip


def main() -> None:
    import torch

    import diffbase.methods
    from diffbase.plot import line_plot

    diffbase.methods.load_all()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "trainer_features.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffbase-features-") as tmp:
        results = {name: run(name, overrides, args.steps, Path(tmp)) for name, (_, overrides) in VARIANTS.items()}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    line_plot({n: r["curve"] for n, r in results.items()}, title="held-out loss by step (toy FLUX.1 LoRA)",
              size=(800, 450)).save(args.out)  # fmt: skip
    base = results["adamw lora"]["final"]
    print(f"toy FLUX.1 LoRA, {args.steps} steps, {torch.get_num_threads()} threads")
    print("| run | change | held-out loss at the end | over AdamW LoRA's | best on the way | train loss, last 50 | s |")
    print("|---|---|---|---|---|---|---|")
    for name, (change, _) in VARIANTS.items():
        r = results[name]
        print(f"| {name} | {change} | {r['final']:.4f} | {r['final'] / base:.3f} | {r['best']:.4f} | "
              f"{r['train_last50']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
