"""Block swap for training (`hardware.offload: blocks`): the frozen weights of all but the first `keep`
transformer blocks wait in (pinned) CPU memory and come to the GPU just before their block runs, in the forward
pass and again in gradient checkpointing's recompute during the backward pass. What trains (LoRA and adapter
weights) never moves.

Why not diffusers' group offloading: it is made for inference. With CUDA streams it offloads by restoring the
CPU copy it took at set-up (an update to a trained weight inside a block would be thrown away), and without
checkpointing autograd keeps every block's weights alive for the backward pass anyway. So training swaps only
frozen weights, needs gradient checkpointing, and a weight that is away holds an empty placeholder: any use of
it while swapped out fails loudly instead of computing with stale values.

A block fetched keeps its weights until a block more than one place away is fetched (the backward pass
runs the blocks in reverse, and a gradient may still need the neighbour's weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffbase.errors import UserError

UNET = ("hardware.offload: blocks swaps transformer blocks (FLUX.1, FLUX.2, SD3); a UNet checkpoints inside its "
        "blocks: use offload: model with model.quantize instead")  # fmt: skip


def check_settings(config: Any) -> None:
    """Before loading: block swap needs checkpointing (a block's weights come back for its recompute) and a
    transformer denoiser."""
    from diffbase.models.specs import spec_for

    h = config.hardware
    if h.offload != "blocks":
        return
    if h.gradient_checkpointing is False:
        raise UserError("hardware.gradient_checkpointing: offload blocks brings each block back for its recompute "
                        "in the backward pass; set it true (or auto)")  # fmt: skip
    if h.keep_blocks < 0:
        raise UserError(f"hardware.keep_blocks: expected 0 or more blocks kept on the GPU, got {h.keep_blocks}")
    if spec_for(config.model.family, config.model.variant).denoiser != "transformer":
        raise UserError(UNET)


def transformer_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """A transformer denoiser's blocks in forward order: the items of its top-level ModuleLists (FLUX's double
    then single blocks, SD3's blocks). Each is what gradient checkpointing recomputes as one call, so its hook
    runs again in the backward pass. A UNet checkpoints its resnets and attention layers inside the down and
    up blocks instead (and SD1.5 and SDXL fit a consumer GPU without swapping): refused."""
    if not hasattr(denoiser, "transformer_blocks"):
        raise UserError(UNET)
    blocks: list[torch.nn.Module] = []
    for child in denoiser.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    return blocks


@dataclass
class BlockSwap:
    """The swapped blocks of one denoiser and where their frozen tensors wait."""

    device: torch.device
    stored: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # block -> (t, cpu)
    resident: set[int] = field(default_factory=set)
    fetches: int = 0  # blocks brought over (tests, the benchmark's transfer count)
    handles: list[Any] = field(default_factory=list)

    def fetch(self, index: int) -> None:
        """Block `index`'s frozen tensors onto the device; blocks more than one place away go back."""
        for other in [i for i in self.resident if abs(i - index) > 1]:
            self.park(other)
        if index in self.resident or index not in self.stored:
            return
        for tensor, cpu in self.stored[index]:
            tensor.data = cpu.to(self.device, non_blocking=True)
        self.resident.add(index)
        self.fetches += 1

    def park(self, index: int) -> None:
        """Block `index`'s frozen tensors off the device: each holds an empty placeholder until fetched."""
        for tensor, cpu in self.stored[index]:
            tensor.data = torch.empty(0, dtype=cpu.dtype, device=self.device)
        self.resident.discard(index)

    def remove(self) -> None:
        """Every weight back on the device and the hooks gone (the denoiser as it was before the swap)."""
        for index in self.stored:
            if index not in self.resident:
                for tensor, cpu in self.stored[index]:
                    tensor.data = cpu.to(self.device)
        self.resident.update(self.stored)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach_block_swap(denoiser: torch.nn.Module, device: torch.device | str, keep: int = 0) -> BlockSwap:
    """Swap the frozen weights of every block after the first `keep`; the rest of the denoiser (and what
    trains) goes to `device`. Call it after the method has frozen the base and added its adapters."""
    device = torch.device(device)
    blocks = transformer_blocks(denoiser)
    if keep < 0 or keep >= len(blocks):
        raise UserError(f"hardware.keep_blocks: expected 0 to {len(blocks) - 1} blocks kept on the GPU, got {keep}")
    swap = BlockSwap(device)
    pin = device.type == "cuda"
    for index, block in enumerate(blocks[keep:], start=keep):
        frozen = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
        if not frozen:
            continue
        pairs = []
        for tensor in frozen:
            cpu = tensor.data.to("cpu")
            pairs.append((tensor, cpu.pin_memory() if pin else cpu))
        swap.stored[index] = pairs
        swap.park(index)
        swap.handles.append(block.register_forward_pre_hook(lambda _m, _a, i=index: swap.fetch(i)))
    if not swap.stored:
        raise UserError("hardware.offload: blocks swaps frozen weights, and every block weight trains here; "
                        "use it with an adapter (lora), or offload: none")  # fmt: skip
    denoiser.to(device)  # what is left: the kept blocks, embeddings, trained weights, the placeholders
    return swap
