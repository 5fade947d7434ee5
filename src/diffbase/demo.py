"""`diffbase demo`: try-on learned on a CPU, on the embedded default, with no downloads.

1. Synthetic try-on data (training split) is written to OUT/data.
2. The shipped toy SD1.5 (pretrained on synthetic people and product shots, never on try-on
   pairs) is fine-tuned for CatVTON-style try-on with the real training engine: only `attn1` trains.
3. On held-out people and held-out garments (pattern and colour combinations never seen in
   training), each person is shown wearing another garment and must be dressed in the target one;
   the ground truth is the same person rendered in the target garment.
4. Scores: masked-region L1, SSIM and PSNR (torchmetrics), KID in a random-weight DINOv2's features (labelled:
   no pretrained network here), and colour / pattern accuracy by the nearest rendering, after
   training, before training, and for two baselines (person unchanged; the garment's mean colour
   pasted into the mask). Writes OUT/index.html, grid.png, loss.png and metrics.json.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbase.config import configs_dir, load_config
from diffbase.data.synthetic import COLOURS, PATTERNS, Garment, make_item, second_colour
from diffbase.io import save_png_atomic, write_json_atomic, write_text_atomic

SEED, SIZE = 0, 32


@dataclass
class EvalSet:
    person: torch.Tensor  # wearing another garment
    garment: torch.Tensor  # product shot of the target garment
    mask: torch.Tensor
    truth: torch.Tensor  # the same person in the target garment
    specs: list[Garment]
    indices: list[int]
    seed: int = SEED
    _renders: list[torch.Tensor] = field(default_factory=list, repr=False)

    def renders(self) -> list[torch.Tensor]:
        """Per item, the same person rendered in every (pattern, colour) with the target's kind and
        scale: what `classify` compares results with. Made once per set, not once per scored method."""
        from diffbase.data.datasets import to_tensor

        if not self._renders:
            for k, i in enumerate(self.indices):
                t = self.specs[k]
                self._renders.append(
                    torch.stack(
                        [
                            to_tensor(
                                make_item(
                                    self.seed,
                                    "test",
                                    i,
                                    (SIZE, SIZE),
                                    garment=Garment(t.kind, p, c, second_colour(c), t.period),
                                ).person
                            )
                            for p, c in CANDIDATES
                        ]
                    )
                )
        return self._renders


CANDIDATES = [(p, c) for p in PATTERNS for c in COLOURS]


def eval_set(n: int, seed: int = SEED) -> EvalSet:
    """Held-out people and garments; the input person wears a different held-out garment."""
    from diffbase.data.datasets import to_tensor

    person, garment, mask, truth, specs = [], [], [], [], []
    for i in range(n):
        target = make_item(seed, "test", i, (SIZE, SIZE))
        other = make_item(seed, "test", i + 7919, (SIZE, SIZE)).spec
        if (other.pattern, other.colour) == (target.spec.pattern, target.spec.colour):
            other = make_item(seed, "test", i + 104729, (SIZE, SIZE)).spec
        wearing = make_item(seed, "test", i, (SIZE, SIZE), garment=other)
        person.append(to_tensor(wearing.person))
        garment.append(to_tensor(target.garment))
        mask.append((to_tensor(target.mask) > 0.5).float())
        truth.append(to_tensor(target.person))
        specs.append(target.spec)
    return EvalSet(
        torch.stack(person), torch.stack(garment), torch.stack(mask), torch.stack(truth), specs, list(range(n)), seed
    )


def classify(results: torch.Tensor, data: EvalSet) -> list[tuple[str, str]]:
    """(pattern, colour) of each result's garment area: the nearest rendering of the same person in
    every pattern and colour (the garment kind and scale as the target's)."""
    from diffbase.methods.tryon.mechanism.metrics import masked_l1

    n, out = len(CANDIDATES), []
    for k, renders in enumerate(data.renders()):
        errors = masked_l1(
            results[k : k + 1].expand(n, -1, -1, -1), renders, data.mask[k : k + 1].expand(n, -1, -1, -1)
        )
        out.append(CANDIDATES[int(errors.argmin())])
    return out


def score(results: torch.Tensor, data: EvalSet) -> dict[str, float]:
    """Masked L1, colour and pattern hits, and the paired SSIM / PSNR (torchmetrics) against the ground truth."""
    from diffbase.methods.tryon.mechanism.metrics import masked_l1, psnr, ssim

    predicted = classify(results, data)
    return {
        "masked_l1": masked_l1(results, data.truth, data.mask).mean().item(),
        "colour_acc": sum(p[1] == s.colour for p, s in zip(predicted, data.specs, strict=True)) / len(data.specs),
        "pattern_acc": sum(p[0] == s.pattern for p, s in zip(predicted, data.specs, strict=True)) / len(data.specs),
        "ssim": ssim(results, data.truth).mean().item(),
        "psnr": psnr(results, data.truth).mean().item(),
    }


def kid_random_features(results: torch.Tensor, data: EvalSet) -> float:
    """KID of the results against the ground truths in a random-weight DINOv2's features: it ranks the rows of
    this demo; the number is not a paper's KID (no pretrained network on this machine)."""
    from diffbase.metrics import features, scores

    net = features.random_dino()
    unit = [(x.clamp(-1, 1) + 1) / 2 for x in (data.truth, results)]  # [-1, 1] -> [0, 1]
    return scores.distribution(net, list(unit[0]), list(unit[1]), "demo")["kid"]


def mean_colour_baseline(data: EvalSet) -> torch.Tensor:
    """The garment's mean colour (over its non-white pixels) pasted into the mask."""
    out = []
    for person, garment, mask in zip(data.person, data.garment, data.mask, strict=True):
        cloth = (garment < 0.95).any(0)
        colour = garment[:, cloth].mean(1) if cloth.any() else garment.mean((1, 2))
        out.append(person * (1 - mask) + colour.view(3, 1, 1) * mask)
    return torch.stack(out)


def run_tryon(model: Path, weights: Path | None, data: EvalSet, settings: Any) -> torch.Tensor:
    from diffbase.methods.tryon.mechanism.sampling import tryon
    from diffbase.methods.tryon.method import VTON

    bb = VTON.load(str(model), str(weights) if weights else None, "catvton")
    results = []
    for start in range(0, len(data.indices), 16):
        sl = slice(start, start + 16)
        results.append(tryon(bb, "catvton", data.person[sl], data.garment[sl], data.mask[sl], settings).cpu())
    return torch.cat(results)


def toy_model() -> Path:
    """The shipped toy SD1.5 (diffusers folder, fp16 weights, about 10 MB)."""
    return Path(__file__).resolve().parent / "zoo_weights" / "sd15-toy"


def run_demo(out: Path, steps: int | None = None, n_train: int = 600, n_eval: int = 48) -> dict[str, Any]:
    from diffbase.data.datasets import to_pil
    from diffbase.data.synthetic import write_dataset
    from diffbase.errors import UserError
    from diffbase.grid import image_grid
    from diffbase.methods import train
    from diffbase.methods.tryon.mechanism.sampling import TryOnSettings

    start = time.time()
    model = toy_model()
    if not (model / "model_index.json").is_file():
        raise UserError(f"{model}: the toy model is missing; rebuild it with `diffbase zoo pretrain sd15-toy {model}`")
    torch.manual_seed(SEED)
    print(f"writing {n_train} synthetic training items to {out / 'data'}")
    write_dataset(out / "data", n_train, 0, seed=SEED, size=(SIZE, SIZE))
    overrides = [
        f"model.pretrained_path={model}",
        f"data.train_path={out / 'data'}",
        f"experiment.output_dir={out / 'run'}",
    ]
    if steps is not None:
        overrides.append(f"training.max_steps={steps}")
    config = load_config(configs_dir() / "experiments" / "demo" / "tryon.yaml", overrides)
    data = eval_set(n_eval)
    v = config.training.tryon
    settings = TryOnSettings(steps=v.steps, guidance=v.guidance, eta=v.eta, seed=SEED)

    print("try-on before training (the pretrained toy base, its own attention)")
    before = run_tryon(model, None, data, settings)
    print(f"training: only attn1 trains ({config.training.max_steps} steps, batch {config.training.batch_size})")
    result = train(config, overwrite=True)  # the demo rebuilds its data and run each time
    print("try-on after training, on held-out people and garments")
    after = run_tryon(model, out / "run" / "vton", data, settings)
    outputs = {"after training": after, "before training": before, "baseline: person unchanged": data.person,
               "baseline: garment mean colour": mean_colour_baseline(data)}  # fmt: skip
    rows = {name: score(images, data) | {"kid_random": kid_random_features(images, data)}
            for name, images in outputs.items()}  # fmt: skip
    grid_rows = [
        [to_pil(data.person[k]), to_pil(data.garment[k]), to_pil(after[k]), to_pil(data.truth[k]), to_pil(before[k])]
        for k in range(min(12, n_eval))
    ]
    header = ["person", "garment", "result", "truth", "before"]
    save_png_atomic(image_grid(grid_rows, header=header, cell=96), out / "grid.png")
    seconds = round(time.time() - start, 1)
    report = {
        "rows": rows,
        "train_steps": result.steps,
        "seconds": seconds,
        "eval_items": n_eval,
        "train_items": n_train,
        "final_train_loss": result.losses[-1] if result.losses else None,
    }
    write_json_atomic(out / "metrics.json", report)
    write_text_atomic(out / "index.html", page(rows, report))
    print(table(rows))
    print(f"wrote {out / 'index.html'}, {out / 'grid.png'}, {out / 'metrics.json'} in {seconds} s")
    print(f"try it in the web UI: .venv/bin/diffbase serve --tryon-weights {out / 'run' / 'vton'}  "
          "(then open http://127.0.0.1:7860, tab Try-on; the training monitor shows this run too)")  # fmt: skip
    return report


def table(rows: dict[str, dict[str, float]]) -> str:
    """The scores; KID's features come from a random-weight DINOv2 (the column says so)."""
    lines = [f"{'':<32}{'masked L1':>10}{'colour':>9}{'pattern':>9}{'SSIM':>7}{'PSNR':>7}{'KID*':>9}"]
    for name, r in rows.items():
        kid = f"{r['kid_random']:>9.4f}" if "kid_random" in r else f"{'':>9}"
        lines.append(f"{name:<32}{r['masked_l1']:>10.3f}{r['colour_acc']:>9.0%}{r['pattern_acc']:>9.0%}"
                     f"{r['ssim']:>7.3f}{r['psnr']:>7.1f}{kid}")  # fmt: skip
    if any("kid_random" in r for r in rows.values()):
        lines.append("* KID in a random-weight DINOv2's features (no pretrained network here): ranks these rows only")
    return "\n".join(lines)


def page(rows: dict[str, dict[str, float]], report: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r['masked_l1']:.3f}</td><td>{r['colour_acc']:.0%}</td>"
        f"<td>{r['pattern_acc']:.0%}</td><td>{r['ssim']:.3f}</td><td>{r['psnr']:.1f}</td>"
        f"<td>{r.get('kid_random', float('nan')):.4f}</td></tr>"
        for n, r in rows.items()
    )
    return (
        "<html><head><meta charset='utf-8'><title>diffbase demo</title></head><body>"
        "<h1>diffbase demo: try-on learned on a CPU</h1>"
        f"<p>The toy SD1.5 was fine-tuned for {report['train_steps']} steps (only its self-attention trains) on "
        f"{report['train_items']} synthetic people, then dressed {report['eval_items']} held-out people in "
        "held-out garments (pattern and colour combinations never seen in training).</p>"
        "<table border='1' cellpadding='4'><tr><th></th><th>masked L1 (lower is better)</th><th>colour</th>"
        "<th>pattern</th><th>SSIM</th><th>PSNR (dB)</th><th>KID (random-weight DINOv2 features: ranks these rows "
        f"only)</th></tr>{cells}</table>"
        "<h2>person | garment | result | ground truth | before training</h2><img src='grid.png'>"
        "<h2>training loss</h2><img src='run/loss.png'>"
        f"<p>{report['seconds']} s in all.</p></body></html>"
    )
