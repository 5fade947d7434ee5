"""Try-on on held-out pairs: the grid people look at (person | garment | result | ground truth)
and the numbers (masked-region L1, PSNR, SSIM against the ground truth of paired data)."""

from __future__ import annotations

from typing import Any

from diffbase.data.datasets import to_pil
from diffbase.methods.tryon.mechanism.data import TryOnDataset
from diffbase.methods.tryon.mechanism.metrics import masked_l1, psnr, ssim
from diffbase.methods.tryon.mechanism.sampling import TryOnSettings, tryon
from diffbase.models.backbone import Backbone


def run_pairs(
    bb: Backbone,
    variant: str,
    dataset: TryOnDataset,
    settings: TryOnSettings,
    limit: int | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Results and metrics for the first `limit` pairs (all by default)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows, scores = [], {"masked_l1": [], "psnr": [], "ssim": []}
    results, reals = [], []  # in [0, 1]: the sets FID and KID compare (results against the real photos)
    paired: list[bool] = []  # per result: its real is its ground truth (else the unpaired person photo)
    for start in range(0, n, batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        if not batch["index"]:
            continue
        result = tryon(bb, variant, batch["person"], batch["garment"], batch["person_mask"], settings).cpu()
        target = batch.get("target")
        if target is not None:
            scores["masked_l1"] += masked_l1(result, target, batch["person_mask"]).tolist()
            scores["psnr"] += psnr(result, target).tolist()
            scores["ssim"] += ssim(result, target).tolist()
        real = target if target is not None else batch["person"]  # unpaired: the test set's own photos
        results += list((result.float().clamp(-1, 1) + 1) / 2)
        reals += list((real.float().clamp(-1, 1) + 1) / 2)
        paired += [target is not None] * result.shape[0]
        for j in range(result.shape[0]):
            row = [to_pil(batch["person"][j]), to_pil(batch["garment"][j]), to_pil(result[j])]
            rows.append(row + ([to_pil(target[j])] if target is not None else []))
    means = {k: sum(v) / len(v) for k, v in scores.items() if v}
    return {"rows": rows, "metrics": means, "count": n, "results": results, "reals": reals, "paired": paired}


def tryon_validation(config: Any, bb: Backbone, held_out: TryOnDataset) -> tuple[Any, dict[str, Any]]:
    """During training: a grid of up to 4 held-out pairs and run_pairs' results of up to 8."""
    from diffbase.grid import image_grid

    v = config.training.tryon
    settings = TryOnSettings(
        steps=config.training.validation.steps,
        guidance=v.guidance,
        eta=v.eta,
        seed=config.training.validation.seed,
        prompt=v.prompt,
    )
    bb.denoiser.eval()
    out = run_pairs(bb, v.variant, held_out, settings, limit=8)
    bb.denoiser.train()
    grid = image_grid(out["rows"][:4], header=["person", "garment", "result", "ground truth"])
    return grid, out
