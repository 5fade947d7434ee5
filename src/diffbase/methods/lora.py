"""LoRA on the denoiser (peft), for every family; exported as diffusers and kohya/ComfyUI files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, register
from diffbase.models import families


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the family's default (Family.lora_targets)


def lora_target_names(denoiser: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear layers whose names end with one of `targets` (a `.`-boundary suffix)."""
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    found, missing = [], []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        (found if hits else missing).extend(hits or [target])
    if missing:
        raise UserError(f"training.lora.target_modules: {missing} match no Linear layer of the denoiser")
    return sorted(set(found))


def add_lora(denoiser: torch.nn.Module, family: str, cfg: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig

    targets = lora_target_names(denoiser, cfg.target_modules or list(families.get(family).lora_targets))
    denoiser.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )


def lora_state_dict(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Only the LoRA layers (`full`: the gathered state dicts of sharded modules)."""
    from peft.utils import get_peft_model_state_dict

    module, gathered = trained.modules["denoiser"], (full or {}).get("denoiser")
    return {"denoiser": {k: v.detach() for k, v in get_peft_model_state_dict(module, state_dict=gathered).items()}}


def load_lora_state_dict(trained: Trained, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(trained.modules["denoiser"], tensors["denoiser"])
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint: unexpected LoRA keys for denoiser: {result.unexpected_keys[:3]}")


def prepare(bb: Any, config: Config) -> Trained:
    text_to_image.freeze(bb)
    add_lora(bb.denoiser, bb.family, config.training.lora)
    params = [p for p in bb.denoiser.parameters() if p.requires_grad]
    return Trained({"denoiser": bb.denoiser}, params, lora_state_dict, load_lora_state_dict)


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    """The LoRA as diffusers and kohya/ComfyUI files, written from CPU copies."""
    from peft.utils import get_peft_model_state_dict

    from diffbase.models.lora_formats import peft_scales, save_diffusers_lora, save_lora, to_kohya
    from diffbase.models.lora_loading import linear_widths
    from diffbase.models.placement import cpu_state

    spec, denoiser, folder = bb.spec, bb.denoiser, out_dir / "lora"
    files = {"diffusers": str(save_diffusers_lora(bb.pipe.__class__, folder, spec.denoiser, denoiser))}
    state = cpu_state({f"{spec.denoiser}.{k}": v for k, v in get_peft_model_state_dict(denoiser).items()})
    kohya = to_kohya(state, peft_scales(denoiser, spec.denoiser), spec.family, linear_widths(denoiser, spec.denoiser))
    files["kohya"] = str(save_lora(kohya, folder / "lora_kohya.safetensors"))
    return files


LORA = register(
    Method(
        name="lora",
        prepare=prepare,
        loss=text_to_image.loss,
        export=export,
        dataset=text_to_image.dataset,
        validate=text_to_image.validate,
        section=("lora", LoraConfig),
        load=text_to_image.load,
        run=text_to_image.run,
        describe="LoRA on the denoiser",
    )
)
