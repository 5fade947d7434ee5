"""Gradient checkpointing `auto`: measured, not guessed. One training step runs without it first; if
that step runs out of memory, or its peak leaves less than `headroom` of the GPU free, checkpointing
is turned on. On the H200 a FLUX.1 LoRA step without it is 1.45x faster (56 GiB), so it pays to
leave it off whenever the step fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class SavedBytes:
    """Counts the bytes autograd keeps for the backward pass while the block runs: the activations of a
    training step, part by part, on any device (the meta device included, so a full-size model's figure
    needs no memory). Storages are counted once; `exclude` holds the parameters, which are weights, not
    activations."""

    def __init__(self, exclude: list[torch.Tensor] | None = None) -> None:
        self.total = 0
        self._seen: set[int] = {storage_id(p) for p in exclude or []}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def add(self, tensor: torch.Tensor) -> None:
        """Count a tensor kept some other way (a checkpointed block's inputs)."""
        key = storage_id(tensor)
        if key not in self._seen:
            self._seen.add(key)
            self.total += tensor.untyped_storage().nbytes()

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def storage_id(tensor: torch.Tensor) -> int:
    """One number per storage, also on the meta device (where every data pointer is 0)."""
    storage = tensor.untyped_storage()
    return storage.data_ptr() if tensor.device.type != "meta" else storage._cdata


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive at once, and their peak, while the mode is on: every storage an op
    returns is counted until it is freed (what `torch.cuda.max_memory_allocated` sees, less the allocator's
    rounding). On fake tensors (torch._subclasses.FakeTensorMode) nothing is allocated, so a full-size model's
    training step is measured on a CPU. Tensors made before the mode (weights, inputs) count once `track`ed."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.live = WeakIdKeyDictionary()
        self.now = 0
        self.peak = 0

    def track(self, tensor: Any) -> None:
        import weakref

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        size = storage.nbytes()
        self.live[storage] = size
        weakref.finalize(storage, self._free, size)
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, size: int) -> None:
        self.now -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.track(tensor)
        return out
