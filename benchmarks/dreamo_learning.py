"""DreamO learning on the shipped toy FLUX.1: held-out reference fidelity before and after training, with the
routing loss on and off on the same budget (same data, seed and steps).

    python benchmarks/dreamo_learning.py [--steps 300] [--items 240]

Fidelity: the denoising error inside the subjects' masks on held-out items (`subject_x0`, lower is better;
diffbase.methods.dreamo.held_out_errors), with each item's own references and, as the control, with the
next item's; and the L1 of sampled images inside the masks (`val_subject_l1_sampled`).
Writes benchmarks/dreamo_learning.json and the last validation grids under outputs/bench_dreamo/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config_path: Path, overrides: list[str], weights: Path | None) -> dict[str, float]:
    """Held-out errors with the right references and with another item's (the control), at step 0
    (`weights` None: the LoRA and condition embeddings as training starts) or from a run's checkpoint."""
    from diffbase.config import load_config
    from diffbase.methods.dreamo.method import dataset, held_out_errors, prepare
    from diffbase.training.checkpoint import load_checkpoint
    from diffbase.training.train import load_backbone

    config = load_config(config_path, overrides)
    bb = load_backbone(config)
    held = dataset(config, True, bb)
    trained = prepare(bb, config)
    if weights is not None:
        trained.load_state_dict(trained, load_checkpoint(weights)[1])
    right = held_out_errors(config, bb, trained, held)
    wrong = held_out_errors(config, bb, trained, held, shift_references=1)
    return {
        "val_loss": right["val_loss"],
        "subject_x0_right_refs": right["val_subject_x0"],
        "subject_x0_other_refs": wrong["val_subject_x0"],
    }


def main() -> None:
    import diffbase.methods as M
    from diffbase.config import load_config
    from diffbase.data.synthetic import write_multi_reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--items", type=int, default=240)
    args = ap.parse_args()
    out = ROOT / "outputs" / "bench_dreamo"
    data = write_multi_reference(out / "data", args.items)
    config_path = ROOT / "configs/experiments/toy/flux1_dreamo.yaml"
    base = [f"data.train_path={data}", f"training.max_steps={args.steps}", "training.checkpoint_every=100000",
            f"training.validation.every={args.steps}", f"model.pretrained_path={ROOT / 'src/diffbase/zoo_weights/flux1-toy'}"]  # fmt: skip
    results = {"steps": args.steps, "items": args.items, "step 0": measure(config_path, base, None)}
    for route in (1.0, 0.0):
        overrides = [*base, f"training.dreamo.lambda_route={route}", f"experiment.output_dir={out / f'route_{route}'}"]
        start = time.perf_counter()
        M.train(load_config(config_path, overrides), show_progress=False, overwrite=True)
        seconds = round(time.perf_counter() - start, 1)
        lines = [json.loads(x) for x in (out / f"route_{route}" / "metrics.jsonl").read_text().splitlines()]
        sampled = [line["val_subject_l1"] for line in lines if "val_subject_l1" in line][-1]
        checkpoint = out / f"route_{route}" / "checkpoints" / f"step-{args.steps:06d}"
        results[f"route_{route}"] = measure(config_path, overrides, checkpoint) | {
            "val_subject_l1_sampled": sampled,
            "train_seconds": seconds,
        }
        print(route, results[f"route_{route}"], flush=True)
    print(json.dumps(results, indent=1))
    (ROOT / "benchmarks" / "dreamo_learning.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
