"""Frozen weights in fewer bits, through the maintained backends (no kernels of our own):

- `fp8`: fp8 (e4m3) storage, computed in the model's dtype: diffusers' layerwise casting (any device).
- `int8`: int8 weight-only, torchao's `Int8WeightOnlyConfig` (any device).
- `qint8`: int8 weights, optimum-quanto's `qint8` (any device).
- `nf4`: 4-bit NormalFloat, bitsandbytes through diffusers (CUDA only).

Speed options for generation (inference only: training on them is refused before loading), where the
activations are quantized too, at every call, so the matmuls themselves run in fewer bits:

- `fp8dq`: float8 (e4m3) weights and activations with a scale per row, torchao's
  `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: CUDA compute capability >= 8.9 (Ada,
  Hopper) and bfloat16 weights; Linear layers whose sizes are not multiples of 16 stay as they are (torchao).
- `int8dq`: int8 weights and activations, torchao's `Int8DynamicActivationInt8WeightConfig` (any device; its
  CPU-testable sibling).

Both are the configs diffusers' `TorchAoConfig(quant_type=...)` takes, applied with torchao's `quantize_` to
every Linear layer of the built model, which is what diffusers' torchao quantizer does while loading: diffbase
builds and loads components itself, then quantizes on the CPU before they move (as `int8`).

`model.quantize` names a backend for the denoiser (`int8`), or one per component
(`{denoiser: int8, t5: fp8}`; the text encoders by their `model.text_encoders` key). peft trains LoRA on
every one of the weight-only layers; what trains stays in full precision, so exports load on an unquantized base.
"""

from __future__ import annotations

from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.runtime import INFERENCE_ONLY, check_available
from diffbase.runtime import QUANTIZE as KINDS

DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}
# Bytes of a quantized component over its bf16 bytes, as measured on the toy FLUX.1 transformer
# (tests/test_quantize.py); nf4: 4 bits and a scale per 64 values.
# int8dq and fp8dq: 0.52 too (one byte per weight and a scale per row; fp8dq measured with torchao's GPU check
# bypassed, as its storage does not depend on the GPU).
OVER_BF16 = {"fp8": 0.63, "int8": 0.52, "qint8": 0.51, "nf4": 0.28, "fp8dq": 0.52, "int8dq": 0.52}


def components_of(value: str | dict[str, str] | None) -> dict[str, str]:
    """model.quantize as {component: kind}: one kind names the denoiser's."""
    return {"denoiser": value} if isinstance(value, str) else dict(value or {})


def plan(value: str | dict[str, str] | None, components: list[str], where: str = "model.quantize") -> dict[str, str]:
    """{component: kind} for what is quantized, each name and kind checked (`components`: the denoiser and the
    text encoders' keys)."""
    if value in (None, "", "none"):
        return {}
    table = components_of(value)
    for component, kind in table.items():
        if component not in components:
            raise UserError(f"{where}: unknown component '{component}'; expected one of {components}")
        if kind not in KINDS:
            raise UserError(f"{where}.{component}: expected one of {', '.join(KINDS)}, got '{kind}'")
    return {c: k for c, k in table.items() if k != "none"}


def check_trainable_backend(value: str | dict[str, str] | None, where: str = "model.quantize") -> None:
    """Before loading a training run: no component on an inference-only backend (fp8dq, int8dq)."""
    for component, kind in components_of(value).items():
        if kind in INFERENCE_ONLY:
            name = where if isinstance(value, str) else f"{where}.{component}"
            raise UserError(f"{name}: {kind} quantizes activations for generation and does not train; use int8, "
                            "fp8, qint8 or nf4 for a quantized base to train on")  # fmt: skip


def quantize(module: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """`module`'s Linear weights stored as `kind`, in place (computed in `compute_dtype`)."""
    if kind == "fp8":  # a diffusers model skips the layers its class names; others diffusers' default ones
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        skip = getattr(module, "_skip_layerwise_casting_patterns", None)  # a diffusers model names its own
        if skip is None:  # a text encoder: also its embeddings (read by weight in places, not only called) and
            # T5's `wo` (it casts its input to the layer's dtype)
            skip = (
                *DEFAULT_SKIP_MODULES_PATTERN,
                "embed",
                "shared",
                *(getattr(module, "_keep_in_fp32_modules", None) or ()),
            )
        apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                skip_modules_pattern=skip, skip_modules_classes=(torch.nn.Conv2d,))  # fmt: skip
    elif kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(module, Int8WeightOnlyConfig())
    elif kind == "fp8dq":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        if compute_dtype != torch.bfloat16:
            raise UserError(
                f"fp8dq scales bfloat16 weights row by row; load the model in bfloat16, not {compute_dtype}"
            )
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    elif kind == "int8dq":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(module, Int8DynamicActivationInt8WeightConfig())
    elif kind == "qint8":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        quanto_quantize(module, weights=qint8)
        freeze(module)
    elif kind == "nf4":
        nf4(module, compute_dtype)
    module.requires_grad_(False)
    return module


def nf4(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """bitsandbytes 4-bit Linear layers in place of the module's Linear layers (CUDA)."""
    import bitsandbytes as bnb

    for child in list(module.modules()):
        for attr, layer in list(child.named_children()):
            if type(layer) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")  # fmt: skip
                q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
                if layer.bias is not None:
                    q.bias = layer.bias
                setattr(child, attr, q.to(layer.weight.device))


def storage_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor holds, counting a quantized tensor's inner data and scales (not its logical size)."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(storage_bytes(getattr(data, n)) for n in names)
    return data.nbytes


def module_bytes(module: torch.nn.Module) -> int:
    return sum(storage_bytes(t) for t in [*module.parameters(), *module.buffers()])


def frozen_in_fewer_bits(model: torch.nn.Module) -> set[int]:
    """The ids of the parameters stored quantized: quantized tensors, and the weights of layers under fp8
    layerwise casting (their hook casts them back to fp8 after every call, so they cannot train)."""
    out = set()
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        cast = registry is not None and registry.get_hook("layerwise_casting") is not None
        for p in module.parameters(recurse=False):
            if cast or type(p.data) is not torch.Tensor:
                out.add(id(p))
    return out


def components(spec: Any) -> dict[str, str]:
    """What can be quantized: {name in model.quantize: pipeline attribute}: the denoiser and each text encoder."""
    return {"denoiser": spec.denoiser} | {te.key: te.component for te in spec.text_encoders}


def quantize_pipeline(pipe: Any, spec: Any, value: str | dict[str, str] | None, dtype: torch.dtype,
                      where: str = "model.quantize", device: Any = None) -> dict[str, str]:  # fmt: skip
    """The pipeline's components quantized as `value` says (in place, before they are placed on the device; with
    `device`, each backend checked first to run there); returns {component: kind} of what was quantized."""
    names = components(spec)
    table = plan(value, list(names), where)
    if device is not None:
        for kind in set(table.values()):
            check_available(kind, device, where)
    for component, kind in table.items():
        module = getattr(pipe, names[component], None)
        if module is None:
            raise UserError(f"{where}: this {spec.pipeline} has no {component}")
        quantize(module, kind, dtype)
    return table


def weight_bytes(count: int, dtype: str, kind: str = "none") -> float:
    """The bytes `count` parameters take in `dtype`, or quantized as `kind`."""
    return count * 2.0 * OVER_BF16[kind] if kind in OVER_BF16 else count * DTYPE_BYTES[dtype]
