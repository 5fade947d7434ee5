"""`diffbase zoo tiny`: complete tiny diffusers folders for every family, built locally."""

from __future__ import annotations

from pathlib import Path

from diffbase.config import configs_dir, load_config
from diffbase.errors import UserError, closest
from diffbase.io import atomic_folder


def tiny_configs() -> dict[str, str]:
    """Every spec row's tiny config: configs/models/<row name, - as _>_tiny.yaml."""
    from diffbase.models.specs import rows

    return {name: f"{name.replace('-', '_')}_tiny.yaml" for name in rows()}


def tiny_config_path(family: str) -> Path:
    TINY_CONFIGS = tiny_configs()  # noqa: N806
    if family not in TINY_CONFIGS:
        raise UserError(
            f"zoo tiny: unknown family '{family}'{closest(family, TINY_CONFIGS)}; expected one of {list(TINY_CONFIGS)}"
        )
    return configs_dir() / "models" / TINY_CONFIGS[family]


def write_tiny_dino(out: Path, seed: int = 0) -> Path:
    """A tiny transformers DINOv2 folder (random weights, 56 px input, 14 px patches) for the upscaler."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)  # fmt: skip
    with atomic_folder(out) as tmp:
        Dinov2Model(config).save_pretrained(tmp, safe_serialization=True)
    return out


def write_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny diffusers-format folder (weights, configs, tokenizers); atomic: temp folder, then rename.
    `dinov2`: a tiny transformers DINOv2 folder instead (the upscaler's feature model)."""
    from diffbase.models.build import build_pipeline

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output folder exists and is not empty")
    if family == "dinov2":
        return write_tiny_dino(out, seed)
    cfg = load_config(tiny_config_path(family)).model
    pipe = build_pipeline(cfg, seed=seed)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
