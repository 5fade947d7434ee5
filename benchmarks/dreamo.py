"""DreamO's cost: generation with 1 and 2 references over plain FLUX.1 generation, in the exact mode (the
official computation: the references go through the transformer at every step) and the cached-reference
mode (their keys and values from the first step only), and the cached mode's error against the exact
result with the same seed. Goal for 1 reference, exact: <= 1.6x plain.

On the shipped toy FLUX.1 by default, with the token counts of the official default scaled down (a target of
4x the reference's tokens: 1024x1024 with 512 px references); on a GPU, benchmarks/gpu.py's `dreamo` stage
runs the same measurement on FLUX.1-dev with random bf16 weights.

python benchmarks/dreamo.py [--steps 12] [--repeats 5] [--size 64] [--ref 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TOY = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def main() -> None:
    from diffbase.methods.dreamo.bench import measure
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings
    from diffbase.models.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="sampling steps (the official default with turbo)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="target side in pixels (toy: 256 tokens)")
    ap.add_argument("--ref", type=int, default=32, help="reference side in pixels (toy: 64 tokens)")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe, _ = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    emb = DreamOEmbeddings.for_pipe(pipe)
    torch.nn.init.normal_(emb.task.weight, std=0.02)
    torch.nn.init.normal_(emb.idx.weight, std=0.02)
    results = measure(pipe, emb, (args.size, args.size), args.ref, args.steps, args.repeats)
    print(f"toy FLUX.1, {args.size}x{args.size} target, {args.ref} px references, {args.steps} steps, "
          f"median of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads")  # fmt: skip
    for name, value in results.items():
        print(f"  {name}: {value:.3f}")
    print(f"goal: 1 ref exact <= 1.6x plain: {'PASS' if results['1 ref, exact: over plain'] <= 1.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
