"""The upscaler's two DINO injections compared on the toy: `tokens` (extra context tokens) against `aligned`
(features resized to the latent grid and added to the image tokens), same seeds, steps and data.

For each seed and injection: the toy experiment (configs/experiments/toy/flux1_upscale_dino.yaml: the shipped
toy FLUX.1 and tiny random DINOv2, batch 8, lr 1e-3) on synthetic people, then

- the held-out flow loss at sigma 0.2 / 0.4 / 0.6 (the method's validation, fixed noise and degradations), with
  the adapter on, and off (the same frozen model: the reference);
- the seam measure of benchmarks/upscale.py (border gradient / mean gradient, 1.0: no seam) on its 128x64 ->
  256x128 image, 32 px tiles fused with 8 px overlap, 20 steps at strength 0.5, through the exported adapter
  loaded as `diffbase upscale` loads it; the plain upscaler (no DINO) and Lanczos are the references;
- the paper metrics of `diffbase eval upscale` (SSIM, PSNR against the originals; the super-resolution
  protocol: each original downscaled x2 bicubic and upscaled back) on 8 fresh synthetic 64x64 people, the
  same sampling settings; the plain upscaler and bicubic are the references.

python benchmarks/upscale_injection.py [--steps 150] [--seeds 0 1 2] [--replot]
Writes benchmarks/upscale_injection.json and benchmarks/upscale_injection.png (--replot: the PNG from the JSON).
One torch thread: on a shared, loaded CPU two threads ran the same steps up to 40x slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from upscale import borders, seam_ratio, source_image

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy"
DINO = ROOT / "src" / "diffbase" / "zoo_weights" / "dinov2-tiny"
INJECTIONS = ("tokens", "aligned")
JSON, PNG = ROOT / "benchmarks" / "upscale_injection.json", ROOT / "benchmarks" / "upscale_injection.png"


def train_one(data: Path, out: Path, injection: str, seed: int, steps: int, every: int) -> dict:
    import diffbase.methods as M
    from diffbase.config import configs_dir, load_config

    overrides = [f"data.train_path={data}", f"experiment.output_dir={out}", f"experiment.seed={seed}",
                 f"training.upscale.dino_injection={injection}", "training.upscale.validation_images=0",
                 f"training.max_steps={steps}", "training.checkpoint_every=0", f"training.validation.every={every}"]  # fmt: skip
    config = load_config(configs_dir() / "experiments" / "toy" / "flux1_upscale_dino.yaml", overrides)
    start = time.perf_counter()
    M.train(config, show_progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    from diffbase.training.metrics import read_metrics

    curve: dict[int, dict[str, float]] = {}
    for row in read_metrics(out / "metrics.jsonl"):
        for key in ("val_loss", "val_loss_adapter_off"):
            if key in row:
                curve.setdefault(row["step"], {})[key] = row[key]
    return {"seconds": round(seconds, 1), "curve": {str(k): v for k, v in sorted(curve.items())},
            "adapter": str(out / "upscale" / "dino_adapter.safetensors")}  # fmt: skip


def load(adapter: str | None) -> object:
    """The upscaler as `diffbase upscale` loads it: with the adapter file (and the toy DINOv2), or plain."""
    from diffbase.methods.upscale.method import UPSCALE

    return UPSCALE.load(str(TOY), str(DINO) if adapter else None, adapter)


def settings(steps: int, strength: float) -> object:
    """The sampling settings of every measure: x2, 32 px tiles fused with 8 px overlap, seed 0."""
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings

    return UpscaleSettings(scale=2.0, strength=strength, steps=steps, seed=0, tile=32, overlap=8)


def seams(loaded: object, source: Image.Image, s: object) -> tuple[float, Image.Image, tuple]:
    """The seam measure of the upscaled source, the image and its tile borders."""
    from diffbase.methods.upscale.method import UPSCALE

    image = UPSCALE.run(loaded, {"image": source}, s)
    xs, ys = borders(loaded[0], image.size, 32, 8)
    return seam_ratio(image, xs, ys), image, (xs, ys)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"tokens": "tab:blue", "aligned": "tab:orange"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    labelled: set[str] = set()
    for run in report["runs"]:
        steps = [int(k) for k in run["curve"]]
        name = run["injection"]
        a.plot(steps, [v["val_loss"] for v in run["curve"].values()], color=colours[name], marker="o", alpha=0.8,
               label=None if name in labelled else f"{name} (one line per seed)")  # fmt: skip
        labelled.add(name)
        if name == INJECTIONS[0]:
            off = [v["val_loss_adapter_off"] for v in run["curve"].values()]
            a.plot(steps, off, color="grey", linestyle="--", linewidth=1,
                   label=None if "off" in labelled else "adapter off (the same seeds)")  # fmt: skip
            labelled.add("off")
    a.set_xlabel("step")
    a.set_ylabel("held-out flow loss (sigma 0.2 / 0.4 / 0.6)")
    a.set_title("held-out loss")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    for i, injection in enumerate(INJECTIONS):
        values = [r["seam"] for r in report["runs"] if r["injection"] == injection]
        b.scatter([i] * len(values), values, color=colours[injection], zorder=3)
        b.hlines(statistics.mean(values), i - 0.2, i + 0.2, color=colours[injection])
    b.axhline(report["seam_plain"], color="grey", linestyle="--", linewidth=1, label="no DINO (plain)")
    b.axhline(report["seam_lanczos"], color="black", linestyle=":", linewidth=1, label="Lanczos, no tiles")
    b.set_xticks(range(len(INJECTIONS)), INJECTIONS)
    b.set_xlim(-0.6, len(INJECTIONS) - 0.4)
    b.set_ylabel("border / mean gradient (1.0: no seam)")
    b.set_title("seams, 32 px tiles fused, 8 px overlap")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.suptitle(f"toy FLUX.1 DINO adapter: tokens vs aligned, {report['args']['steps']} steps, "
                 f"seeds {report['args']['seeds']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def quality(loaded: object | None, originals: list[Image.Image], s: object) -> dict[str, float]:
    """Mean SSIM / PSNR of the originals downscaled x2 (bicubic) and upscaled back, against the originals; with
    `loaded` None: plain bicubic upscaling."""
    from diffbase.methods.upscale.method import UPSCALE
    from diffbase.metrics import images, scores

    rows = []
    for original in originals:
        small = original.resize((original.width // 2, original.height // 2), Image.BICUBIC)
        result = (
            small.resize(original.size, Image.BICUBIC) if loaded is None else UPSCALE.run(loaded, {"image": small}, s)
        )
        rows.append(scores.paired(images.to_tensor(result.resize(original.size)), images.to_tensor(original)))
    return scores.means(rows)


def summary(report: dict) -> dict:
    """Per injection: the final held-out loss and its gain over adapter-off, and the seam measure, as mean and
    spread over seeds; and the per-seed differences aligned - tokens (paired: same seed, data, held-out set)."""
    out: dict = {}
    final = {(r["injection"], r["seed"]): r for r in report["runs"]}
    for injection in INJECTIONS:
        runs = [r for r in report["runs"] if r["injection"] == injection]
        last = [list(r["curve"].values())[-1] for r in runs]
        on = [v["val_loss"] for v in last]
        gain = [v["val_loss_adapter_off"] - v["val_loss"] for v in last]
        seam = [r["seam"] for r in runs]
        ssim, psnr = [r["quality"]["ssim"] for r in runs], [r["quality"]["psnr"] for r in runs]
        out[injection] = {name: {"mean": statistics.mean(x), "stdev": statistics.stdev(x) if len(x) > 1 else 0.0,
                                 "per_seed": x} for name, x in (("val_loss", on), ("gain_over_off", gain),
                                                                ("seam", seam), ("ssim", ssim), ("psnr", psnr))}  # fmt: skip
    diffs = {"val_loss": [], "seam": []}
    for seed in report["args"]["seeds"]:
        a, t = final[("aligned", seed)], final[("tokens", seed)]
        diffs["val_loss"].append(list(a["curve"].values())[-1]["val_loss"] - list(t["curve"].values())[-1]["val_loss"])
        diffs["seam"].append(a["seam"] - t["seam"])
    out["aligned_minus_tokens"] = diffs
    return out


def main() -> None:
    from diffbase.data.synthetic import write_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50, help="validation every this many steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=200, help="synthetic training images (64x64), a tenth held out")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--replot", action="store_true", help="only draw the PNG from the JSON")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(JSON.read_text()), PNG)
        return
    torch.set_num_threads(1)
    work = ROOT / "outputs" / "bench_upscale_injection"
    data = work / "synth64" / "train" / "image"
    if not data.is_dir():
        write_dataset(work / "synth64", args.images, 0)
    if not (work / "originals" / "test" / "image").is_dir():
        write_dataset(work / "originals", 0, 8, seed=1)
    originals = [Image.open(f).convert("RGB") for f in sorted((work / "originals" / "test" / "image").glob("*.png"))]
    source, s = source_image(), settings(args.sample_steps, args.strength)
    report: dict = {"args": vars(args), "runs": []}
    plain_upscaler = load(None)
    report["seam_plain"], plain, lines = seams(plain_upscaler, source, s)
    report["seam_lanczos"] = seam_ratio(source.resize(plain.size, Image.LANCZOS), *lines)
    print(f"seams: plain {report['seam_plain']:.3f}, Lanczos {report['seam_lanczos']:.3f}", flush=True)
    for name, loaded in (("plain", plain_upscaler), ("bicubic", None)):
        report[f"quality_{name}"] = quality(loaded, originals, s)
        print(f"quality {name}: {report[f'quality_{name}']}", flush=True)
    for seed in args.seeds:
        for injection in INJECTIONS:
            run = train_one(data, work / f"{injection}_{seed}", injection, seed, args.steps, args.every)
            upscaler = load(run["adapter"])
            run["seam"], _, _ = seams(upscaler, source, s)
            run["quality"] = quality(upscaler, originals, s)
            run |= {"injection": injection, "seed": seed}
            report["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "adapter"}), flush=True)
    report["summary"] = summary(report)
    JSON.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, PNG)
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
