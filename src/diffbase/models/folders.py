"""Load a diffusers folder from local files only; the family is read from its `model_index.json`,
nothing is fetched from a hub."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffbase.errors import UserError, first_line
from diffbase.models.footprint import check_fits
from diffbase.models.placement import place_pipeline
from diffbase.models.quantize import quantize_pipeline
from diffbase.models.specs import FamilySpec, spec_for_pipeline
from diffbase.runtime import torch_dtype


def quiet_loading() -> None:
    """No per-component loading bars: the CLI shows its own progress and keeps stderr for errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def read_model_index(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: model path not found")
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise UserError(f"{folder}: expected a diffusers model folder with model_index.json")
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{index}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable or not text: one line, not a traceback
        raise UserError(f"{index}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None


def detect_family(path: str | Path) -> FamilySpec:
    """The family spec of a diffusers folder, from the pipeline class in model_index.json."""
    index = read_model_index(path)
    return spec_for_pipeline(str(index.get("_class_name")), f"{Path(path) / 'model_index.json'}")


def _check_components(folder: Path, index: dict[str, Any]) -> None:
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if not (folder / name).is_dir():
            raise UserError(f"{folder}: model_index.json lists '{name}' but the folder {folder / name} is missing")


def load_pipeline(
    path: str | Path, dtype: str = "float32", device: Any = "cpu", offload: str = "none", quantize: Any = "none",
    offload_blocks: int = 1, prepare: Callable[[Any, FamilySpec], None] | None = None,
) -> tuple[Any, FamilySpec]:  # fmt: skip
    """A diffusers pipeline from a local folder, with its family spec; `prepare` (a method's weights going in:
    fused LoRAs, its attention processors) runs on the CPU, then the pipeline is quantized as `quantize` says
    and placed by the device policy, offload hooks last, so they see the finished model."""
    import diffusers

    folder = Path(path)
    index = read_model_index(folder)
    spec = spec_for_pipeline(str(index.get("_class_name")), str(folder / "model_index.json"))
    _check_components(folder, index)
    check_fits(folder, spec, dtype, quantize, offload, device)  # before anything loads
    cls = getattr(diffusers, spec.pipeline)
    quiet_loading()
    try:
        pipe = cls.from_pretrained(folder, dtype=torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder}: could not load {spec.pipeline}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe, spec)
    quantize_pipeline(pipe, spec, quantize, torch_dtype(dtype), "--quantize")
    return place_pipeline(pipe, device, offload, offload_blocks), spec


def local_pretrained(path: str | Path, option: str, what: str, *classes: Any) -> list[Any]:
    """Each transformers class's `from_pretrained(path)` from the local folder only; a folder that does not hold
    `what` is one line naming the option that gave it (a feature network, a parser, a depth or pose model)."""
    try:
        return [cls.from_pretrained(path, local_files_only=True) for cls in classes]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{option}: {path}: not {what} ({first_line(exc)})") from None
