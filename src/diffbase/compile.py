"""Regional compilation (`--compile`, `hardware.compile`): torch.compile on each repeated block of a denoiser
instead of the whole model, as diffusers' `compile_repeated_blocks` does. Every block of one class shares one
compiled graph, so compiling costs about one block's time per class rather than the whole network's, and a
LoRA, DreamFit or DreamO processor inside a block is compiled with it.

Where diffusers names no repeated blocks (SD3's transformer, the UNets), diffbase names them here. The number
of graphs dynamo built is reported after a run (`graphs()`): more graphs than block classes means
recompilations (new shapes or guards), which cost time at every first use.

The mode (`--compile MODE`, `hardware.compile: MODE`; `true` and a bare `--compile` are `default`) goes to each
block's torch.compile: `reduce-overhead` replays CUDA graphs (fewer kernel launches: worth it where shapes
are static, as in generation at one size; each new shape records another graph), `max-autotune` also
benchmarks matmul kernels while compiling (much longer first call), `max-autotune-no-cudagraphs` the same
without graphs. Torch runs `reduce-overhead` on a CPU as plain compilation (it skips the graphs), so on a
CPU it is refused rather than silently the same as `default`; model or layer offload moves the weights the
graphs would hold, so it needs offload none.
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
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's; as config.py
GRAPH_MODES = ("reduce-overhead",)  # the modes that capture CUDA graphs


def mode(value: bool | str | None, key: str = "hardware.compile") -> str | None:
    """The torch.compile mode a setting stands for: None (off: false, none), `default` (true), or a named mode;
    anything else is a one-line error."""
    if value in (None, False, "false", "none"):
        return None
    if value in (True, "true"):
        return "default"
    if value not in MODES:
        raise UserError(f"{key}: expected true, false or one of {', '.join(MODES)}, got '{value}'")
    return str(value)


def options(value: bool | str | None) -> dict[str, Any]:
    """torch.compile's keyword arguments for a setting (empty when off)."""
    chosen = mode(value)
    return {} if chosen is None else {"mode": chosen}


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


def check(compile_on: bool | str | None, offload: str, key: str = "hardware.compile", device: Any = None) -> str | None:
    """Before loading: the mode is known, compilation and the offload modes that move weights inside blocks do
    not mix, and CUDA graphs run on a CUDA device (`device`, when known) with nothing offloaded. Returns the mode
    (None: off)."""
    chosen = mode(compile_on, key)
    if chosen and offload in INCOMPATIBLE_OFFLOAD:
        raise UserError(f"{key}: regional compilation does not combine with offload '{offload}' (its hooks move "
                        "weights inside the compiled blocks); use offload none or model, or turn compile off")  # fmt: skip
    if chosen in GRAPH_MODES:
        kind = device_type(device)
        if kind not in (None, "cuda"):
            raise UserError(f"{key}: {chosen} captures CUDA graphs and torch skips them on {kind} (it would be plain "
                            "compilation); use default or max-autotune there")  # fmt: skip
        if offload != "none":
            raise UserError(f"{key}: {chosen} (CUDA graphs) needs offload none: offload '{offload}' moves the "
                            "weights the graphs hold between calls")  # fmt: skip
    return chosen


def device_type(device: Any) -> str | None:
    """`cuda`, `cpu`, ... for a torch device or a device setting (`auto`: cuda when torch sees one); None: unknown."""
    if device is None or not isinstance(device, str):
        return getattr(device, "type", None)
    if device in ("auto", ""):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (one per block class when nothing recompiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
