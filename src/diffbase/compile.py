"""Regional compilation (`--compile`, `hardware.compile`): torch.compile on each repeated block of a denoiser
instead of the whole model, as diffusers' `compile_repeated_blocks` does. Every block of one class shares one
compiled graph, so compiling costs about one block's time per class rather than the whole network's, and a
LoRA, DreamFit or DreamO processor inside a block is compiled with it.

Where diffusers names no repeated blocks (SD3's transformer, the UNets), diffbase names them here. The number
of graphs dynamo built is reported after a run (`graphs()`): more graphs than block classes means
recompilations (new shapes or guards), which cost time at every first use.
"""

from __future__ import annotations

from typing import Any

from diffbase.errors import UserError

# denoisers without diffusers' `_repeated_blocks`: the block classes diffbase compiles in them
REGIONS = {
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "UNet2DConditionModel": ("BasicTransformerBlock", "ResnetBlock2D"),
    "UNet2DModel": ("ResnetBlock2D",),
}
INCOMPATIBLE_OFFLOAD = ("sequential", "blocks")  # their hooks move weights inside the compiled region


def block_classes(model: Any) -> tuple[str, ...]:
    """The class names of the repeated blocks of `model` (empty: none known, the whole model compiles)."""
    return tuple(getattr(model, "_repeated_blocks", None) or REGIONS.get(type(model).__name__, ()))


def compile_blocks(model: Any, **options: Any) -> int:
    """Compile each repeated block of `model` in place (torch.compile `options`); returns how many modules were
    compiled. A model with no known blocks compiles as one region."""
    names = block_classes(model)
    count = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.compile(**options)
            count += 1
    if count == 0:
        model.compile(**options)
        count = 1
    return count


def check(compile_on: bool, offload: str, key: str = "hardware.compile") -> None:
    """Before loading: compilation and the offload modes that move weights inside blocks do not mix."""
    if compile_on and offload in INCOMPATIBLE_OFFLOAD:
        raise UserError(f"{key}: regional compilation does not combine with offload '{offload}' (its hooks move "
                        "weights inside the compiled blocks); use offload none or model, or turn compile off")  # fmt: skip


def graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (one per block class when nothing recompiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
