"""DreamO learning on the shipped toy FLUX.1: held-out reference fidelity before and after training, with the
routing loss on and off on the same budget (same data, seed and steps).

    python benchmarks/dreamo_learning.py [--steps 300] [--items 240]

Fidelity: the denoising error inside the subjects' masks on held-out items (`subject_x0`, lower is better;
diffbase.methods.dreamo.held_out_errors), with each item's own references and, as the control, with the
next item's; and the L1 of sampled images inside the masks (`val_subject_l1_sampled`). Beside them the paper
metrics of diffbase.metrics on the same held-out samples (sampled at the validation settings): SSIM and PSNR
against the targets, and DreamBench's DINO score (cosine of class tokens, result vs each of its references)
over a random-weight DINOv2 (`dino_random`, with the next item's references as the control: compares runs
with each other, not with any paper).
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
    from diffbase.methods.dreamo.mechanism.evaluate import held_out_samples
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
    } | paper_metrics(held_out_samples(config, bb, trained.modules["dreamo"], held, limit=len(held)))


def paper_metrics(samples: list[dict]) -> dict[str, float]:
    """SSIM / PSNR against the targets and the DINO score against the references (random-weight DINOv2), with
    the next sample's references as the control."""
    from diffbase.metrics import features, images, scores

    net = features.random_dino()
    results = [images.to_tensor(s["result"]) for s in samples]
    paired = scores.means(
        [scores.paired(r, images.to_tensor(s["target"])) for r, s in zip(results, samples, strict=True)]
    )

    def dino(shift: int) -> float:  # each result against each reference of the sample `shift` places on
        pairs = [(r, images.to_tensor(x)) for i, r in enumerate(results)
                 for x in samples[(i + shift) % len(samples)]["references"]]  # fmt: skip
        return scores.dino_score(net, [r for r, _ in pairs], [x for _, x in pairs])

    return {"samples": len(samples), **paired, "dino_random_right_refs": dino(0), "dino_random_other_refs": dino(1),
            "subject_l1_sampled": sum(s["subject_l1"] for s in samples) / len(samples)}  # fmt: skip


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
