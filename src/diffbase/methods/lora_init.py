"""Continue a LoRA (training.lora.init_from): an existing file's layers become the new adapter's starting weights,
with the file's scale carried over so the first step computes what the file computes. Reads the layouts diffbase
loads: diffusers/peft (with its alpha metadata), kohya/ComfyUI (FLUX.1's BFL names too) and LyCORIS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.models import families
from diffbase.models.lora_formats import (
    LYCORIS_TYPES,
    file_layer_names,
    is_kohya_flux,
    is_lycoris,
    kohya_flux_to_diffusers,
    lycoris_layers,
    lycoris_rank,
)

KEY = "training.lora.init_from"


def init_from(bb: Any, cfg: Any, path: Path) -> None:
    """Set the denoiser's adapter (already added, as `cfg` says) to the layers of the LoRA file at `path`."""
    from peft.utils import set_peft_model_state_dict

    from diffbase.models.lora_loading import read_lora_keys, read_state

    keys = read_lora_keys(path)
    state = read_state(path)
    if is_lycoris(keys) != (cfg.type in LYCORIS_TYPES):
        raise UserError(f"{KEY}: {path} is a {'LyCORIS' if is_lycoris(keys) else 'LoRA'} file; training.lora.type "
                        f"is {cfg.type}")  # fmt: skip
    layers = lycoris_start(bb, state, path) if is_lycoris(keys) else lora_start(bb, state, path)
    if not layers:
        raise UserError(f"{KEY}: {path}: no layer of it is a layer this run adapts (training.lora.target_modules)")
    result = set_peft_model_state_dict(bb.denoiser, layers)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{KEY}: {path}: layers this run does not adapt: {result.unexpected_keys[:3]}")
    print(f"{KEY}: started from {len({k.rsplit('.', 2)[0] for k in layers})} layers of {path}")


def adapted(bb: Any) -> dict[str, Any]:
    """The denoiser's adapted layers by path."""
    return {n: m for n, m in bb.denoiser.named_modules() if "default" in getattr(m, "scaling", {})}


def check_shape(path: Path, name: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    if tensor.shape != target.shape:
        raise UserError(f"{KEY}: {path}: {name} has shape {tuple(tensor.shape)}, this run's adapter "
                        f"{tuple(target.shape)} (training.lora.rank / factor / type must match the file)")  # fmt: skip


def lora_start(bb: Any, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """peft keys for a LoRA file: lora_B divided by this adapter's scale and times the file's."""
    layers = adapted(bb)
    out: dict[str, torch.Tensor] = {}
    for name, (a, b, scale, magnitude) in lora_pairs(bb, state, path).items():
        if name not in layers:
            continue
        module = layers[name]
        check_shape(path, name, a, module.lora_A["default"].weight)
        check_shape(path, name, b, module.lora_B["default"].weight)
        out[f"{name}.lora_A.weight"] = a.float()
        out[f"{name}.lora_B.weight"] = b.float() * scale / module.scaling["default"]
        if magnitude is not None and hasattr(module, "lora_magnitude_vector"):
            out[f"{name}.lora_magnitude_vector"] = magnitude.float().flatten()
    return out


def lora_pairs(bb: Any, state: dict[str, torch.Tensor], path: Path) -> dict[str, tuple]:
    """{denoiser layer path: (A, B, the file's scale, DoRA magnitude or None)} from any LoRA layout."""
    spec = bb.spec
    keys = list(state)
    if families.get(spec.family).bfl_layout and is_kohya_flux(keys):
        from diffbase.models.lora_loading import linear_widths

        state = kohya_flux_to_diffusers(state, linear_widths(bb.denoiser, spec.denoiser))  # scale baked in
    prefix = f"{spec.denoiser}."
    pairs = {}
    alphas = file_alphas(path)
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight")
            name = layer.removeprefix(prefix)
            magnitude = state.get(f"{layer}.lora_magnitude_vector")
            pairs[name] = (a, state[f"{layer}.lora_B.weight"], alphas(name, a.shape[0]) / a.shape[0], magnitude)
        elif key.endswith(".lora_down.weight"):  # kohya names of a UNet (diffusers module names)
            layer = key.removesuffix(".lora_down.weight")
            name = kohya_names(bb).get(layer)
            if name is not None:
                alpha = float(state.get(f"{layer}.alpha", torch.tensor(float(a.shape[0]))))
                pairs[name] = (a, state[f"{layer}.lora_up.weight"], alpha / a.shape[0], None)
    return pairs


def file_alphas(path: Path) -> Callable[[str, int], float]:
    """(layer path, rank) -> the layer's alpha in a diffusers file's adapter metadata (alpha_pattern, else
    lora_alpha); the rank itself (scale 1, as diffusers loads it) when the file has no metadata."""
    from safetensors import safe_open

    meta = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("lora_adapter_metadata")
    config = {k.split(".", 1)[1]: v for k, v in json.loads(meta).items() if "." in k} if meta else {}
    default, pattern = config.get("lora_alpha"), config.get("alpha_pattern") or {}

    def alpha(name: str, rank: int) -> float:
        found = next((v for k, v in pattern.items() if name == k or name.endswith("." + k)), default)
        return float(found) if found is not None else float(rank)

    return alpha


def kohya_names(bb: Any) -> dict[str, str]:
    """{name in a kohya or LyCORIS file: denoiser layer path}: kohya's UNet names, or the transformer names
    OneTrainer and SimpleTuner write."""
    unet = bb.spec.denoiser == "unet"
    return file_layer_names(bb.denoiser, ("lora_unet_",) if unet else ("lora_transformer_", "lycoris_"))


def lycoris_start(bb: Any, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """peft keys for a LyCORIS file: its scale (alpha / rank, or 1) moved into the first factor, divided by this
    adapter's."""
    names, layers, out = kohya_names(bb), adapted(bb), {}
    for file_name, parts in lycoris_layers(state).items():
        name = names.get(file_name)
        if name not in layers:
            continue
        module, parts = layers[name], dict(parts)
        rank = lycoris_rank(parts)
        alpha = parts.pop("alpha", None)
        scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
        own = {p: getattr(module, p)["default"] for p in module.adapter_layer_names if "default" in getattr(module, p)}
        if set(own) != set(parts):
            raise UserError(f"{KEY}: {path}: {file_name} has {sorted(parts)}, this run's adapter {sorted(own)} "
                            "(training.lora.rank / factor / type must match the file)")  # fmt: skip
        first = next(p for p in ("lokr_w1", "lokr_w1_a", "hada_w1_a") if p in parts)
        for part, tensor in parts.items():
            check_shape(path, f"{file_name}.{part}", tensor, own[part])
            factor = scale / module.scaling["default"] if part == first else 1.0
            out[f"{name}.{part}"] = tensor.float() * factor
    return out
