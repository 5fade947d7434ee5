"""Single-file checkpoints (BFL, ComfyUI, original SD) with a local diffusers folder for the rest.

The folder gives the configs, tokenizers, text encoders and VAE; the file gives the weights.
FLUX.1 BFL and ComfyUI files go through our own converter (`bfl_flux`), which works at any
width; the other layouts through diffusers' `from_single_file` with the folder as config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.models import families
from diffbase.models.bfl_flux import COMFY_PREFIX, bfl_to_diffusers, is_bfl_flux1
from diffbase.models.folders import detect_family, load_pipeline, quiet_loading
from diffbase.models.gguf import is_quantized, quantized_model, read_gguf, shape
from diffbase.models.specs import FamilySpec
from diffbase.runtime import torch_dtype

# Key fragments that identify what a file holds, checked in order.
LAYOUTS = [
    ("flux2", ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight")),
    ("flux1", ("double_blocks.0.img_attn.qkv.weight",)),
    ("sd3", ("joint_blocks.0.", "transformer_blocks.0.ff_context.")),
    ("sdxl", ("conditioner.embedders.1.", "model.diffusion_model.label_emb.")),
    ("sd15", ("model.diffusion_model.input_blocks.",)),
]
DIFFUSERS_FLUX1 = ("single_transformer_blocks.0.proj_mlp.weight",)  # diffusers' FLUX.1 transformer (SD3 has none)
# Weights of one component of a diffusers folder (a UNet, an SD3 or FLUX.2 transformer, a VAE).
DIFFUSERS_PARTS = ("down_blocks.0.resnets.0.conv1.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
                   "pos_embed.proj.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")  # fmt: skip


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a pickle through `torch.load(weights_only=True)` only."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if path.suffix == ".gguf":
        return read_gguf(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many types for a damaged file
        raise UserError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a mapping of tensor names to tensors")
    return state


def detect_layout(keys: list[str]) -> str:
    """Which family's checkpoint this is, from its key names ("unknown" when none matches;
    "diffusers-part" for one component of a diffusers folder)."""
    if any(k.removeprefix(COMFY_PREFIX) in DIFFUSERS_FLUX1 for k in keys):  # before SD3: both have ff_context
        return "flux1"
    if any(k in DIFFUSERS_PARTS for k in keys):
        return "diffusers-part"
    for family, markers in LAYOUTS:
        if any(m in k for k in keys for m in markers):
            return family
    return "unknown"


def check_against(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Missing, unexpected and mis-shaped keys as one clear line before anything is loaded."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and shape(tensor) != tuple(expected[key].shape):
            raise UserError(
                f"{path}: key {key} has shape {shape(tensor)}, the config folder expects {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{path}: keys do not match the config folder's transformer: {'; '.join(parts)}")


def _flux1_transformer(path: Path, state: dict[str, torch.Tensor], folder: Path, dtype: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    keys = list(state)
    converted = (
        bfl_to_diffusers(state) if is_bfl_flux1(keys) else {k.removeprefix(COMFY_PREFIX): v for k, v in state.items()}
    )
    # An all-in-one file also holds the VAE and text encoders: keep the transformer's tensors.
    converted = {
        k: v
        for k, v in converted.items()
        if not k.startswith(("vae.", "text_encoders.", "first_stage_model.", "conditioner.", "cond_stage_model."))
    }
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    check_against(model, converted, path)
    if any(is_quantized(v) for v in converted.values()):  # a GGUF file: its weights stay quantized
        return quantized_model(FluxTransformer2DModel, config, converted, torch_dtype(dtype))
    model.load_state_dict(converted, assign=True, strict=True)
    return model.to(torch_dtype(dtype))


def load_single_file_pipeline(path: Path, config: Path, dtype: str = "float32") -> tuple[Any, FamilySpec]:
    """A pipeline whose denoiser (or whole model) comes from `path`, the rest from the folder `config`
    (on the CPU; the caller places it)."""
    if not config.is_dir():
        raise UserError(f"--config: {config} is not a diffusers folder")
    spec = detect_family(config)
    state = read_state_dict(path)
    found = detect_layout(list(state))
    if found == "diffusers-part":
        raise UserError(
            f"{path}: diffusers-layout weights of one component (a folder's unet/, transformer/ or vae/), not a "
            f"single-file checkpoint; put the file in that subfolder of a copy of {config} and pass the folder "
            "as --model"
        )
    if found == "unknown":
        raise UserError(f"{path}: no known checkpoint layout (BFL, ComfyUI, original SD or diffusers) in its keys")
    if found != spec.family:
        raise UserError(f"{path}: found a {found} checkpoint, expected {spec.family} (from {config})")
    if path.suffix == ".gguf" and not families.get(spec.family).bfl_layout:
        raise UserError(f"{path}: GGUF files load for FLUX.1 transformers here; {config} holds a {spec.family} model")
    if families.get(spec.family).bfl_layout:
        transformer = _flux1_transformer(path, state, config, dtype)
        pipe, spec = load_pipeline(config, dtype=dtype, device="cpu")
        pipe.transformer = transformer
        pipe.register_modules(transformer=transformer)
        return pipe, spec
    return _diffusers_single_file(path, config, spec, dtype)


def _diffusers_single_file(path: Path, config: Path, spec: FamilySpec, dtype: str) -> tuple[Any, FamilySpec]:
    """Other layouts through diffusers' converters, offline, with the local folder as config."""
    import diffusers

    quiet_loading()
    denoiser_cls = getattr(diffusers, spec.denoiser_class)
    pipe, spec = load_pipeline(config, dtype=dtype, device="cpu")
    try:
        model = denoiser_cls.from_single_file(
            str(path),
            config=str(config),
            subfolder=spec.denoiser,
            local_files_only=True,
            torch_dtype=torch_dtype(dtype),
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: could not convert to {spec.denoiser_class}: {first[:200]}") from None
    setattr(pipe, spec.denoiser, model)
    pipe.register_modules(**{spec.denoiser: model})
    return pipe, spec
