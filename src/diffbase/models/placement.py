"""One device policy: where each component lives while caching, training, validating, exporting and
generating, so nothing runs on the CPU of a GPU machine by accident.

- The compute device is `auto` (cuda when torch sees one, else cpu) or what the user names.
- Without offload every component lives on the compute device from load time on: encoding, caching,
  validation and inference all run there.
- With `offload: model` (training) the denoiser lives on the device and the text encoders and VAE
  are parked on the CPU, brought over only while they encode or decode (`encoders_on`). Inference
  offload is diffusers' own (`enable_model_cpu_offload`, `enable_sequential_cpu_offload`, and block-level
  group offloading for `blocks`); sampling loops put their tensors on `execution_device(pipe)`, never on a
  component's own device (with offload that is the CPU until the component runs).
- Exports are written from CPU copies, whatever device the trained weights are on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.runtime import resolve_device  # noqa: F401  (where the loaders' callers found it)

TRAINING_OFFLOAD = ("none", "model", "blocks")
INFERENCE_OFFLOAD = ("none", "model", "sequential", "blocks")


def encoder_modules(bb: Any) -> list[torch.nn.Module]:
    """The text encoders and the VAE of a backbone (those still loaded)."""
    modules = [getattr(bb.pipe, te.component, None) for te in bb.spec.text_encoders] + [bb.pipe.vae]
    return [m for m in modules if isinstance(m, torch.nn.Module)]


def component_devices(pipe: Any) -> dict[str, str]:
    """{component: device type of its first tensor} for every module of a pipeline (tests, `doctor`)."""
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            first = next(iter(module.parameters()), None)
            if first is None:
                first = next(iter(module.buffers()), None)
            if first is not None:
                out[name] = first.device.type
    return out


def place_for_training(bb: Any, device: torch.device | str, offload: str = "none") -> None:
    """The denoiser (and a ControlNet) on `device`; text encoders and VAE there too, or parked on the
    CPU with `offload: model` or `blocks`. With `blocks` the denoiser waits on the CPU until the method has
    added what trains; then `models.block_swap` sends all but the swapped weights over."""
    if offload not in TRAINING_OFFLOAD:
        raise UserError(f"hardware.offload: expected one of {', '.join(TRAINING_OFFLOAD)}, got '{offload}'")
    device = torch.device(device)
    if offload != "blocks":
        bb.denoiser.to(device)
    if bb.controlnet is not None:
        bb.controlnet.to(device)
    home = torch.device("cpu") if offload in ("model", "blocks") else device
    for module in encoder_modules(bb):
        module.to(home)


@contextlib.contextmanager
def encoders_on(bb: Any) -> Iterator[None]:
    """Text encoders and the VAE on the denoiser's device for the duration (they may be parked on the
    CPU by offload or after caching), and back where they were afterwards."""
    device = bb.device
    away = [(m, d) for m in encoder_modules(bb) if (d := _device_of(m)) is not None and d != device]
    for m, _ in away:  # only what is elsewhere moves: a no-op per step when nothing is offloaded
        m.to(device)
    try:
        yield
    finally:
        for m, d in away:
            m.to(d)


def _device_of(module: torch.nn.Module) -> torch.device | None:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else None


def place_pipeline(pipe: Any, device: torch.device | str, offload: str = "none", blocks: int = 1) -> Any:
    """An inference pipeline on `device`, or offloaded with diffusers' hooks (model: whole components
    move in turn; blocks: groups of `blocks` transformer blocks stream in and out, prefetched on CUDA
    streams when a group is one block; sequential: layer by layer, slowest, least memory)."""
    if offload not in INFERENCE_OFFLOAD:
        raise UserError(f"--offload: expected one of {', '.join(INFERENCE_OFFLOAD)}, got '{offload}'")
    device = torch.device(device)
    if offload != "none" and device.type == "cpu":
        raise UserError(f"--offload {offload}: offloading moves weights to an accelerator in turn; the device is cpu")
    return offload_hooks(pipe, device, offload, blocks)


def offload_hooks(pipe: Any, device: torch.device, offload: str, blocks: int = 1) -> Any:
    """The hooks themselves, for any device (tests install them with the CPU as the compute device)."""
    if offload == "none":
        return pipe.to(device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        streams = device.type == "cuda" and blocks == 1  # diffusers prefetches with streams one block at a time
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=blocks, use_stream=streams)  # fmt: skip
    return pipe


def execution_device(pipe: Any) -> torch.device:
    """Where a pipeline computes: its components' device, or the device offload hooks bring them to."""
    return torch.device(pipe._execution_device)


def compute_device(pipe: Any, module: torch.nn.Module) -> torch.device:
    """Where one component computes: where its weights are, or, when accelerate's (model, sequential) or
    diffusers' (group) offload hooks manage it, the device they bring it to (its weights wait on the CPU,
    or on `meta` with sequential offload)."""
    if hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook"):
        return execution_device(pipe)
    return next(module.parameters()).device


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what file writers need, whatever device trained the weights."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def copy_policy(device: torch.device | str) -> tuple[bool, bool]:
    """(pin, non_blocking) for a host tensor going to `device`. To CUDA: pinned and queued, so the host does not
    wait for the GPU (torch's blocking host-to-GPU copy synchronizes the stream); to the CPU, neither (a no-op)."""
    cuda = torch.device(device).type == "cuda"
    return cuda, cuda


def to_device(
    x: torch.Tensor, like: torch.Tensor | torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`x.to(device, dtype)` through `copy_policy`, with the same values: a host tensor is converted on the host
    first, as torch's own host-to-GPU copy converts, then pinned and queued. `like` a tensor: its device and dtype."""
    if isinstance(like, torch.Tensor):
        device, dtype = like.device, dtype or like.dtype
    else:
        device = torch.device(like)
    pin, non_blocking = copy_policy(device)
    if x.device.type != "cpu" or not non_blocking:
        return x.to(device, dtype)
    x = x if dtype is None else x.to(dtype)
    return (x.pin_memory() if pin else x).to(device, non_blocking=True)
