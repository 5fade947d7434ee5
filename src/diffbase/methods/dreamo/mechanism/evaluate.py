"""How well generations keep their references: the L1 between a generated image and its target inside
each reference's subject mask, on held-out items, with the weights as they are."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffbase.data.datasets import to_pil
from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings


def subject_l1(result: Image.Image, target: torch.Tensor, masks: list[torch.Tensor]) -> float:
    """Mean absolute error in [0, 1] units inside the union of the subject masks (everywhere without one)."""
    got = np.asarray(result.convert("RGB"), dtype=np.float32) / 255.0
    want = (target.float().permute(1, 2, 0).cpu().numpy() + 1) / 2
    region = np.zeros(got.shape[:2], dtype=bool)
    for m in masks:
        if not torch.isnan(m).any():
            region |= m[0].cpu().numpy() > 0.5
    if not region.any():
        region[:] = True
    return float(np.abs(got - want)[region].mean())


@torch.no_grad()
def held_out_samples(
    config: Any, bb: Any, emb: DreamOEmbeddings, held_out: Any, limit: int | None = None
) -> list[dict]:
    """The first held-out items generated with the weights as they are (seeded per item): per item its
    reference images, the result, the target, the caption and the subject L1 between result and target."""
    from diffbase.methods.dreamo.mechanism.generate import DreamOSettings, Reference, dreamo_generate

    d, v = config.training.dreamo, config.training.validation
    h, w = d.size
    samples = []
    was_training = bb.denoiser.training
    bb.denoiser.eval()
    count = min(len(held_out), limit if limit is not None else d.validation_items)
    for i in range(count):
        item = held_out[i]
        if item is None:
            continue
        refs = [
            Reference(to_pil(r), t, k + 1)
            for k, (r, t) in enumerate(zip(item["references"], item["tasks"], strict=True))
        ]
        settings = DreamOSettings(prompt=item["caption"], height=h, width=w, steps=v.steps,
                                  guidance=v.guidance if v.guidance is not None else 3.5, seed=v.seed + i)  # fmt: skip
        result = dreamo_generate(bb.pipe, emb, refs, settings)
        samples.append({"references": [r.image for r in refs], "result": result, "target": to_pil(item["pixels"]),
                        "caption": item["caption"], "subject_l1": subject_l1(result, item["pixels"], item["route_masks"])})  # fmt: skip
    bb.denoiser.train(was_training)
    return samples


def samples_grid(samples: list[dict]) -> Image.Image | None:
    """references | result | target, a row per sample."""
    from diffbase.grid import image_grid

    if not samples:
        return None
    rows = [[*s["references"], s["result"], s["target"]] for s in samples]
    width = max(len(r) for r in rows)
    header = [f"reference {k + 1}" for k in range(width - 2)] + ["result", "target"]
    return image_grid(rows, header=header)
