"""LoRA files onto a pipeline for generation: diffusers, kohya/ComfyUI and XLabs layouts.

diffusers' `load_lora_weights` converts the kohya and XLabs layouts itself; we add the checks it
lacks: the file exists, it is a LoRA of this family, and at least one layer took it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.models import families
from diffbase.models.lora_formats import (
    file_layer_names,
    is_kohya_flux,
    is_lycoris,
    kohya_flux_to_diffusers,
    lycoris_delta,
    lycoris_layers,
    lycoris_prefix,
)
from diffbase.models.specs import FamilySpec

# Key fragments that identify a LoRA's family; a LoRA of another family would load nothing.


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]`: the scale is what follows the last ':' when it reads as a number. A folder
    stands for the diffusers LoRA file in it (a training run's lora/ folder)."""
    path, scale = Path(text), 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        with contextlib.suppress(ValueError):
            path, scale = Path(head), float(tail)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return path, scale


def read_lora_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise UserError(f"{path}: not a readable LoRA checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of tensors")
    return list(state)


def read_state(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle errors come in many types; torch's is a page long)
        raise UserError(f"{path}: not a readable LoRA checkpoint ({type(exc).__name__})") from None


def linear_widths(module: Any, prefix: str) -> dict[str, int]:
    """Output width of every linear layer, keyed like LoRA layer paths."""
    import torch

    return {f"{prefix}.{n}": m.out_features for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


# Key fragments only a UNet's LoRA has: its down / up / mid blocks (diffusers' names, and the original SD ones)
UNET_ONLY = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")


def check_family(path: Path, keys: list[str], spec: FamilySpec) -> None:
    if is_lycoris(keys):
        return  # its layer names are checked against the model as it merges (merge_lycoris)
    if not any("lora" in k or k.endswith((".down.weight", ".up.weight")) for k in keys):
        raise UserError(f"{path}: no LoRA weights found (expected lora_A/lora_B, lora_down/lora_up or down/up keys)")
    own = families.get(spec.family).lora_markers
    if spec.denoiser != "unet" and any(part in k for k in keys for part in UNET_ONLY):  # (a UNet's attention
        # layers are `transformer_blocks` too, which a transformer family's markers would take for its own)
        raise UserError(f"{path}: a LoRA for a UNet model (SD1.5 / SDXL), expected one for {spec.pipeline}")
    if not any(marker in k for k in keys for marker in own):
        others = [f for f in families.FAMILIES.values() if f.lora_markers != own]
        found = next((f.title for f in others if any(m in k for k in keys for m in f.lora_markers)), "unknown")
        raise UserError(f"{path}: a LoRA for a {found} model, expected one for {spec.pipeline}")


def _adapted_layers(pipe: Any, adapter: str) -> int:
    count = 0
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for sub in module.modules():
            if adapter in getattr(sub, "lora_A", {}):
                count += 1
    return count


def check_loras(lora_args: list[str], spec: FamilySpec | None) -> None:
    """Each `FILE[:SCALE]` readable and, given the folder's family (None: a single file), a LoRA of it, before the
    model loads: a typo'd path or another family's LoRA was found only after the load (minutes at full size)."""
    for arg in lora_args:
        path, _ = parse_lora_arg(arg)
        keys = read_lora_keys(path)
        if spec is not None:
            check_family(path, keys, spec)


def apply_loras(pipe: Any, spec: FamilySpec, lora_args: list[str]) -> None:
    """Load each `FILE[:SCALE]` as its own adapter and activate them together."""
    names, weights = [], []
    for i, arg in enumerate(lora_args):
        path, scale = parse_lora_arg(arg)
        keys = read_lora_keys(path)
        check_family(path, keys, spec)
        if is_lycoris(keys):  # LoKr / LoHa: merged into the weights, as ComfyUI applies them
            merge_lycoris(pipe, spec, path, scale)
            continue
        name = f"lora{i}"
        source: Any = str(path)
        if families.get(spec.family).bfl_layout and is_kohya_flux(keys):  # diffusers' own converter assumes width 3072
            source = kohya_flux_to_diffusers(read_state(path), linear_widths(pipe.transformer, "transformer"))
        try:
            pipe.load_lora_weights(source, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path}: could not load onto {spec.pipeline}: {first[:300]}") from None
        if _adapted_layers(pipe, name) == 0:
            raise UserError(f"{path}: no layer of the {spec.pipeline} matched this LoRA")
        names.append(name)
        weights.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)


def merge_lycoris(pipe: Any, spec: FamilySpec, path: Path, scale: float) -> int:
    """Add `scale` x each LoKr / LoHa layer's weight change to the denoiser's weights (diffusers loads no
    LyCORIS file); returns the number of layers changed. Every layer of the file must be in the model."""
    import torch

    denoiser = getattr(pipe, spec.denoiser)
    paths = file_layer_names(denoiser, (lycoris_prefix(spec.denoiser == "unet"),))
    layers = lycoris_layers(read_state(path))
    missing = [name for name in layers if name not in paths]
    if missing:
        raise UserError(f"{path}: layer {missing[0]} (and {len(missing) - 1} more) is not in this {spec.pipeline}")
    with torch.no_grad():
        for name, parts in layers.items():
            layer = denoiser.get_submodule(paths[name])
            weight = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight
            if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
                raise UserError(f"{path}: LoKr / LoHa files are merged into the weights, which are quantized here; "
                                "load the model without --quantize")  # fmt: skip
            delta = lycoris_delta(parts).reshape(weight.shape)
            weight.add_((scale * delta).to(weight.device, weight.dtype))
    return len(layers)
