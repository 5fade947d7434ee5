"""Gradient checkpointing `auto`: measured, not guessed. One training step runs without it first; if
that step runs out of memory, or its peak leaves less than `headroom` of the GPU free, checkpointing
is turned on. On the H200 a FLUX.1 LoRA step without it is 1.45x faster (56 GiB), so it pays to
leave it off whenever the step fits."""

from __future__ import annotations

from collections.abc import Callable

import torch

HEADROOM = 0.92  # peak / total above this: too close to the edge, turn checkpointing on


def needs_checkpointing(oom: bool, peak_bytes: int, total_bytes: int, headroom: float = HEADROOM) -> bool:
    return oom or peak_bytes > headroom * total_bytes


def probe_needs_checkpointing(run_step: Callable[[], None], device: torch.device) -> tuple[bool, str]:
    """Run one step without checkpointing on a CUDA device and decide; on a CPU there is no accelerator
    memory to run out of, so it stays off. Returns (decision, the reason in words)."""
    if device.type != "cuda":
        return False, "off (no accelerator memory to save on a CPU)"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    oom = False
    try:
        run_step()
    except torch.OutOfMemoryError:
        oom = True
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    on = needs_checkpointing(oom, peak, total)
    gib = 2**30
    if oom:
        return on, f"on (one step without it ran out of {total / gib:.0f} GiB)"
    return on, f"{'on' if on else 'off'} (one step without it peaked at {peak / gib:.1f} of {total / gib:.0f} GiB)"
