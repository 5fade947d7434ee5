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


def meta_components(target: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The modules of a model config YAML or a diffusers folder, built on the meta device."""
    import torch

    path = Path(target)
    with torch.device("meta"):
        if path.is_dir():
            return _folder_modules(path)
        if path.suffix in (".yaml", ".yml"):
            from diffbase.config import load_config
            from diffbase.models.build import build_components

            cfg = load_config(path, overrides).model
            components = build_components(cfg, tiny_tokenizers=False)
            return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    raise UserError(f"{path}: expected a model config .yaml or a diffusers folder")


def component_counts(target: str | Path, overrides: list[str] | None = None,
                     components: dict[str, Any] | None = None) -> dict[str, int]:  # fmt: skip
    """Parameters per component of a model config YAML or a diffusers folder (or of `components` built already)."""
    modules = components if components is not None else meta_components(target, overrides)
    return {name: _count(m) for name, m in modules.items()}


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def trainable(target: str | Path, overrides: list[str] | None = None,
              components: dict[str, Any] | None = None) -> tuple[int, str] | None:  # fmt: skip
    """For an experiment config: what its method trains (count and the method's words), found by letting
    the method prepare the backbone built on the meta device (`components`: built already; the method adds to
    them). None for a bare model config."""
    import torch

    path = Path(target)
    if path.suffix not in (".yaml", ".yml"):
        return None
    from diffbase.config import load_config
    from diffbase.methods import get
    from diffbase.models.backbone import Backbone
    from diffbase.models.specs import spec_for

    config = load_config(path, overrides)
    if "method" not in load_raw_training(path):
        return None
    method = get(config.training.method)
    components = components if components is not None else meta_components(path, overrides)
    with torch.device("meta"):
        bb = Backbone(spec_for(config.model.family, config.model.variant), _Components(components))
        trained = method.prepare(bb, config)
    return sum(p.numel() for p in trained.trainable), method.describe


class _Components:
    """Just enough of a pipeline for `prepare` on the meta device: attributes and `components`."""

    def __init__(self, components: dict[str, Any]) -> None:
        self.__dict__.update(components)
        self.components = components


def load_raw_training(path: Path) -> dict[str, Any]:
    from diffbase.config import load_raw

    return load_raw(path).get("training") or {}


def describe(target: str, overrides: list[str] | None = None) -> str:
    components = meta_components(target, overrides)
    counts = component_counts(target, components=components)  # before the method adds to the model
    width = max(len(k) for k in counts) if counts else 10
    lines = [f"{name:<{width}}  {human(n):>9}  ({n:,})" for name, n in counts.items()]
    total = sum(counts.values())
    lines.append(f"{'total':<{width}}  {human(total):>9}  ({total:,})")
    trains = trainable(target, overrides, components)
    if trains is not None:
        count, words = trains
        lines.append(f"{'trains':<{width}}  {human(count):>9}  ({count:,}; {words})")
    return "\n".join(lines)
