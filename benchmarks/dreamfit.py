"""DreamFit generation cost against plain FLUX.1 generation, in one process, on the shipped toy FLUX.1.

- DreamFit generation (one write pass, then every step reads the banks) over plain generation with
  the same steps, model and size (goal <= 1.3 at 28 steps), median of interleaved runs;
- a read-pass step with the bank queries dropped over one that keeps them (the official path);
- the banks' memory (keys and values of every block).

python benchmarks/dreamfit.py [--steps 28] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from diffbase.dreamfit.checkpoint import Dims, LoraPair, diffusers_name, random_official
from diffbase.dreamfit.generate import DreamFitSettings, dreamfit_generate, reference_image
from diffbase.dreamfit.mechanism import install, write_banks
from diffbase.models.loading import load_pipeline

TOY = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(steps: int = 28, repeats: int = 5, size: int = 32) -> None:
    pipe, _ = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    pairs = {}
    for key, (down, up) in random_official(Dims.of(t), rank=16).items():
        kind, index, name = key.split("_blocks.")[0], int(key.split(".")[1]), key.split(".", 2)[2]
        pairs[diffusers_name(kind, index, name)] = LoraPair(down, up, 1.0)
    prompt = "a person wearing a striped red t-shirt"
    settings = DreamFitSettings(prompt=prompt, steps=steps, guidance=4.0, height=size, width=size)
    garment = Image.new("RGB", (size, size), (200, 40, 40))
    reference = reference_image("garment", garment, (size, size))

    def plain() -> None:
        state.mode = "off"
        pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=32,
        )

    def dreamfit() -> None:
        dreamfit_generate(pipe, state, settings, reference)

    state = install(t, pairs)
    plain(), dreamfit()  # warm-up
    ratios = [timed(dreamfit) / timed(plain) for _ in range(repeats)]

    # one read step with and without the bank queries, and the bank's size
    g = torch.Generator().manual_seed(0)
    tokens, text = (size // 4) ** 2, 32
    ids = torch.stack(torch.meshgrid(torch.arange(size // 4), torch.arange(size // 4), indexing="ij"), -1).reshape(
        -1, 2
    )
    x = {
        "hidden_states": torch.randn(1, tokens, t.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, t.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([4.0]),
        "img_ids": torch.cat([torch.zeros(tokens, 1), ids.float()], 1),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    step_ratios = []
    with torch.no_grad():
        for _ in range(repeats):
            state.keep_bank_queries = False
            write_banks(t, state, **x)
            bank = state.bank_bytes()
            fast = min(timed(lambda: t(**x)) for _ in range(5))
            state.keep_bank_queries = True
            write_banks(t, state, **x)
            slow = min(timed(lambda: t(**x)) for _ in range(5))
            step_ratios.append(fast / slow)
    state.clear()
    print("| measure | value |\n|---|---|")
    print(
        f"| DreamFit generation over plain FLUX.1 (toy, {size}x{size}, {steps} steps), median of {repeats} | "
        f"{statistics.median(ratios):.3f} (goal <= 1.3) |"
    )
    print(
        f"| read-pass step, bank queries dropped over kept, median of {repeats} | {statistics.median(step_ratios):.3f} |"
    )
    print(
        f"| bank memory (keys and values, every block, {tokens} image + {text} text tokens) | {bank / 1024:.1f} KiB |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.steps, args.repeats)
