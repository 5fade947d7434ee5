"""Load a backbone from local files only: a diffusers folder (models.folders), or a single-file
checkpoint with a local folder for everything else (models.single_file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.models.folders import detect_family, load_pipeline, quiet_loading, read_model_index
from diffbase.models.placement import place_pipeline
from diffbase.models.quantize import quantize_pipeline
from diffbase.models.single_file import load_single_file_pipeline
from diffbase.models.specs import FamilySpec
from diffbase.runtime import torch_dtype

__all__ = ["detect_family", "load_model", "load_pipeline", "quiet_loading", "read_model_index"]


def load_model(
    model: str | Path,
    config: str | Path | None = None,
    dtype: str = "float32",
    device: Any = "cpu",
    offload: str = "none",
    quantize: Any = "none",
    offload_blocks: int = 1,
) -> tuple[Any, FamilySpec]:
    """A pipeline from a diffusers folder, or from a single-file checkpoint plus a local config folder."""
    path = Path(model)
    if path.is_dir():
        if config is not None:
            raise UserError(f"--config: only for single-file checkpoints; {path} is a folder")
        return load_pipeline(path, dtype, device, offload, quantize, offload_blocks)
    if not path.exists():
        raise UserError(f"{path}: model path not found")
    if config is None:
        raise UserError(f"{path}: a single-file checkpoint needs --config, a local diffusers folder of the same family")
    pipe, spec = load_single_file_pipeline(path, Path(config), dtype=dtype)
    quantize_pipeline(pipe, spec, quantize, torch_dtype(dtype), "--quantize")
    return place_pipeline(pipe, device, offload, offload_blocks), spec
