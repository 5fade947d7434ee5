"""Generation overhead: our `generate` over the bare diffusers pipeline, same tiny model, same process.

Prints the median ratio of interleaved timings (goal <= 1.05) and the `diffbase --help` wall time.
Ratios only: this machine is noisy, and absolute times mean something only on a GPU.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(family: str = "flux1", steps: int = 8, size: int = 128, repeats: int = 7) -> None:
    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.loading import load_pipeline
    from diffbase.models.zoo import write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny(family, Path(tmp) / family)
        pipe, spec = load_pipeline(folder)
        settings = GenerateSettings(prompt="a photo of a cat", seed=0, steps=steps, height=size, width=size)

        def ours() -> None:
            generate(pipe, spec, settings)

        def bare() -> None:
            with torch.inference_mode():
                pipe(
                    prompt=settings.prompt,
                    num_inference_steps=steps,
                    height=size,
                    width=size,
                    generator=torch.Generator("cpu").manual_seed(0),
                ).images[0]

        ours(), bare()  # warm-up
        ratios = []
        for _ in range(repeats):
            t_bare, t_ours = time_call(bare), time_call(ours)
            ratios.append(t_ours / t_bare)
        script = Path(sys.executable).parent / "diffbase"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "diffbase.cli"]
        help_times = [
            time_call(lambda: subprocess.run([*command, "--help"], capture_output=True, check=True)) for _ in range(5)
        ]
    print("| measure | value |\n|---|---|")
    print(
        f"| generate ({family} tiny, {size}px, {steps} steps): ours / bare diffusers, median of {repeats} | "
        f"{statistics.median(ratios):.3f} (goal <= 1.05) |"
    )
    print(f"| `diffbase --help` wall time, median of 5 | {statistics.median(help_times):.2f} s (goal < 1.5 s) |")


if __name__ == "__main__":
    main()
