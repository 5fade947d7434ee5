"""GGUF single files (the quantized checkpoints ComfyUI users hold) of the FLUX.1 transformer: read by
diffusers' GGUF loader (the `gguf` package), in BFL or diffusers names, and kept quantized: diffusers'
GGUFLinear layers dequantize each weight when it is used (no kernels of our own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF file: quantized ones as diffusers' GGUFParameter (raw blocks, their quant type)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{path}: reading GGUF files needs the gguf package: pip install 'diffbase[quantize]'")
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path))
    except Exception as exc:  # the gguf reader raises many types for a damaged file
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None


def is_quantized(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "quant_type")


def shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's logical shape (a GGUF tensor's raw blocks have another)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def quantized_model(model_cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """`model_cls` from `config` with `state`'s quantized weights in GGUFLinear layers (computed in `dtype`) and
    the rest in `dtype`; every parameter comes from `state` (the caller checked the names and shapes)."""
    from accelerate import init_empty_weights
    from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

    with init_empty_weights():
        model = model_cls.from_config(config)
    model = _replace_with_gguf_linear(model, dtype, state)
    for name, value in state.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if is_quantized(value):
            setattr(module, attr, value)
        else:
            setattr(module, attr, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    return model.eval()
