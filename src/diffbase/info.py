"""`diffbase info`: parameter counts of a model, built on the meta device (no weights, no memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffbase.errors import UserError


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _folder_modules(folder: Path) -> dict[str, Any]:
    import diffusers
    import transformers

    from diffbase.models.loading import read_model_index

    modules = {}
    for name, value in read_model_index(folder).items():
        if name.startswith("_") or not isinstance(value, list) or value[0] not in ("diffusers", "transformers"):
            continue
        library, cls_name = value
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            if not hasattr(cls, "load_config") or not issubclass(cls, diffusers.ModelMixin):
                continue
            modules[name] = cls.from_config(cls.load_config(folder / name))
        else:
            cls = getattr(transformers, cls_name, None)
            if cls is None or not hasattr(cls, "config_class") or "Tokenizer" in cls_name:
                continue
            config = json.loads((folder / name / "config.json").read_text())
            modules[name] = cls(transformers.AutoConfig.for_model(**config))
    return modules


def component_counts(target: str | Path, overrides: list[str] | None = None) -> dict[str, int]:
    """Parameters per component of a model config YAML or a diffusers folder."""
    import torch

    path = Path(target)
    with torch.device("meta"):
        if path.is_dir():
            modules = _folder_modules(path)
        elif path.suffix in (".yaml", ".yml"):
            from diffbase.config import load_config
            from diffbase.models.build import build_components

            cfg = load_config(path, overrides).model
            modules = {
                k: v for k, v in build_components(cfg, tiny_tokenizers=False).items() if isinstance(v, torch.nn.Module)
            }
        else:
            raise UserError(f"{path}: expected a model config .yaml or a diffusers folder")
    return {name: _count(m) for name, m in modules.items()}


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def vton_trainable(target: str | Path, overrides: list[str] | None = None) -> int | None:
    """For a try-on experiment (training.method vton): the attn1 parameters that train, on the meta device."""
    import torch

    path = Path(target)
    if path.suffix not in (".yaml", ".yml"):
        return None
    from diffbase.config import load_config

    config = load_config(path, overrides)
    if config.training.method != "vton":
        return None
    from diffbase.models.build import build_components
    from diffbase.tryon.vton import attn1_count, expand_conv_in

    with torch.device("meta"):
        unet = build_components(config.model, tiny_tokenizers=False)["unet"]
        expand_conv_in(unet, config.training.vton.variant)
    return attn1_count(unet)


def describe(target: str, overrides: list[str] | None = None) -> str:
    counts = component_counts(target, overrides)
    width = max(len(k) for k in counts) if counts else 10
    lines = [f"{name:<{width}}  {human(n):>9}  ({n:,})" for name, n in counts.items()]
    total = sum(counts.values())
    lines.append(f"{'total':<{width}}  {human(total):>9}  ({total:,})")
    trainable = vton_trainable(target, overrides)
    if trainable is not None:
        lines.append(f"{'trains':<{width}}  {human(trainable):>9}  ({trainable:,}; every attn1 to_q/to_k/to_v/to_out)")
    return "\n".join(lines)
