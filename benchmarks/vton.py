"""Attention-only try-on training against full fine-tuning of the same UNet, in one process.

Same model (the toy SD1.5 architecture, random weights), same canvases, same loss
(`diffbase.methods.tryon.method`), AdamW in both. Reports, as ratios attention-only / full:
optimizer-state memory (measured from the optimizer's tensors after a step) and step time
(median of interleaved steps), plus the optimizer-state ratio for the real SD1.5 UNet from its
config on the meta device (49.57M of 859.5M parameters train).

python benchmarks/vton.py [--steps 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffbase.methods
from diffbase.config import configs_dir, load_config
from diffbase.methods.registry import Trained
from diffbase.methods.tryon.mechanism.vton import attn1_count, expand_conv_in, prepare_unet
from diffbase.methods.tryon.method import VTON
from diffbase.models.backbone import Backbone
from diffbase.models.build import build_pipeline
from diffbase.models.specs import spec_for

diffbase.methods.load_all()  # registers the methods' config sections


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def setup(full: bool, batch: int) -> tuple[Backbone, torch.optim.Optimizer, dict, object]:
    """A toy SD1.5 set up for try-on, its optimizer, a random batch, and the vton method's loss."""
    config = load_config(configs_dir() / "models" / "sd15_toy.yaml", ["training.tryon.variant=catvton"])
    pipe = build_pipeline(config.model, seed=0)
    params = prepare_unet(pipe.unet, "catvton")
    if full:
        pipe.unet.requires_grad_(True)
        params = list(pipe.unet.parameters())
    pipe.unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    data = {
        "index": list(range(batch)),
        "person": torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
        "garment": torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
        "person_mask": (torch.rand(batch, 1, 32, 32, generator=g) > 0.5).float(),
    }
    trained = Trained({"denoiser": pipe.unet}, params)

    def loss(bb: Backbone, batch: dict, seed: int, step: int) -> torch.Tensor:
        return VTON.loss(config, bb, trained, batch, None, step)[0]

    return Backbone(spec_for("sd15", "toy"), pipe), opt, data, loss


def step(bb: Backbone, opt: torch.optim.Optimizer, data: dict, loss_fn, n: int) -> float:
    start = time.perf_counter()
    loss = loss_fn(bb, data, 0, n)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(steps: int = 20, batch: int = 8) -> None:
    attn, full = setup(False, batch), setup(True, batch)
    for run in (attn, full):
        step(*run, 0)  # warm-up; creates the optimizer state
    memory = optimizer_bytes(attn[1]) / optimizer_bytes(full[1])
    ratios = [step(*attn, i) / step(*full, i) for i in range(1, steps + 1)]
    real = load_config(configs_dir() / "experiments" / "tryon_vton_sd15.yaml")
    with torch.device("meta"):
        from diffbase.models.build import build_components

        unet = build_components(real.model, tiny_tokenizers=False)["unet"]
        expand_conv_in(unet, "vton")
    total = sum(p.numel() for p in unet.parameters())
    print("| measure (attention-only / full fine-tuning) | value |\n|---|---|")
    print(f"| optimizer state, toy SD1.5 UNet (measured) | {memory:.3f} |")
    print(
        f"| optimizer state, real SD1.5 UNet (from its config: {attn1_count(unet) / 1e6:.2f}M of "
        f"{total / 1e6:.1f}M) | {attn1_count(unet) / total:.3f} |"
    )
    print(
        f"| step time, toy SD1.5, batch {batch}, 32x32 canvases, median of {steps} interleaved | "
        f"{statistics.median(ratios):.3f} |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    main(args.steps, args.batch)
