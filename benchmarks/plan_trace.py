"""`diffbase plan`'s two figures against the peaks measured on a GPU (a CPU, a few minutes, no weights):

the estimate (weights and trained state counted exactly, activations by a rule calibrated on FLUX.1-dev) and
`--trace` (two training steps of the full-size model on fake tensors, every storage counted), for the shipped
experiment configs benchmarks/gpu.py trains, beside the H200's measured peak in the training loop where one
exists (benchmarks/RESULTS.md, `gpu`: torch.cuda.max_memory_allocated; issue goal: within 10%), and for the
families the estimate has no rule for (the UNets) or has not been measured on.

python benchmarks/plan_trace.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
H200 = "H200, 2026-11-30"
RUNS = (  # (config, overrides, measured GiB on the H200 or None)
    ("flux1_dev_lora.yaml", ["hardware.gradient_checkpointing=false"], 50.0),
    (
        "flux1_dev_lora.yaml",
        ["hardware.gradient_checkpointing=false", "data.cache_latents=false", "data.cache_text=false"],
        58.9,
    ),  # fmt: skip
    ("flux2_klein_4b_lora.yaml", ["hardware.gradient_checkpointing=false"], 23.5),
    ("flux1_dev_lora.yaml", ["hardware.gradient_checkpointing=true"], None),
    ("flux2_klein_9b_lora.yaml", ["hardware.gradient_checkpointing=false"], None),
    ("sd35_large_lora.yaml", ["hardware.gradient_checkpointing=false"], None),
    ("sdxl_lora.yaml", ["hardware.gradient_checkpointing=false"], None),
    ("sd15_lora.yaml", ["hardware.gradient_checkpointing=false"], None),
)


def row(config: str, overrides: list[str], measured: float | None) -> str:
    from diffbase.plan import GIB, on_gpu, plan
    from diffbase.plan_trace import trace

    path = EXPERIMENTS / config
    parts = plan(path, overrides)
    estimate = sum(p.bytes for p in parts) / GIB
    has_rule = any(p.name == "activations (estimate)" for p in parts)
    step = trace(path, overrides, on_gpu(path, overrides))
    traced = step.peak / GIB
    settings = " ".join(o.split(".")[-1] for o in overrides)
    cells = [config, settings, f"{estimate:.1f}" + ("" if has_rule else " (no activation rule)"), f"{traced:.1f}",
             f"{step.seconds:.0f}", f"{measured:.1f}" if measured else "not measured"]  # fmt: skip
    if measured:
        cells += [f"{estimate / measured:.3f}", f"{traced / measured:.3f}",
                  "PASS" if abs(traced / measured - 1) <= 0.10 else "FAIL"]  # fmt: skip
    else:
        cells += ["", "", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    import diffbase  # noqa: F401  (registers the families and methods)

    print(
        "| config | settings | estimate GiB | traced GiB | trace s | measured GiB (" + H200 + ") | "
        "estimate / measured | traced / measured | traced within 10% |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for config, overrides, measured in RUNS:
        print(row(config, overrides, measured), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
