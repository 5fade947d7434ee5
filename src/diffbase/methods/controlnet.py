"""ControlNet training: a ControlNet initialised from the denoiser (as diffusers' examples do), the
denoiser frozen; exported as a diffusers folder. Validation images go through the family's
ControlNet pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.models import backbone as B


@dataclass
class ControlNetConfig:
    conditioning_scale: float = 1.0
    num_layers: int | None = None  # None: the family default for a ControlNet made from the denoiser
    num_single_layers: int | None = None
    pretrained_path: str | None = None


def make_controlnet(denoiser: torch.nn.Module, family: str, c: ControlNetConfig) -> torch.nn.Module:
    """A ControlNet made from the denoiser as the family's diffusers class does it (or loaded from a folder)."""
    import diffusers

    try:
        support = B.controlnet_support(family).controlnet
    except ValueError as err:
        raise UserError(f"training.method: controlnet: {err}") from None
    if c.pretrained_path:
        return getattr(diffusers, support.model_class).from_pretrained(c.pretrained_path, local_files_only=True)
    return support.make(denoiser, c.num_layers, c.num_single_layers)


def prepare(bb: Any, config: Config) -> Trained:
    text_to_image.freeze(bb)
    controlnet = make_controlnet(bb.denoiser, bb.family, config.training.controlnet).train()
    controlnet.requires_grad_(True)
    bb.controlnet = controlnet  # validation and the loss find it on the backbone
    return Trained({"controlnet": controlnet}, list(controlnet.parameters()))


def loss(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return text_to_image.loss(
        config, bb, trained, batch, cache, step, guide=guide(config, bb, trained.call("controlnet"))
    )


def guide(config: Config, bb: B.Backbone, controlnet: torch.nn.Module) -> B.Guide:
    """The ControlNet's residuals for the noisy latents of a batch, as diffusers' ControlNet pipelines
    compute them (the batch's `control` image, training.controlnet.conditioning_scale)."""
    scale, guidance = config.training.controlnet.conditioning_scale, config.training.objective.guidance

    def residuals(noisy: torch.Tensor, timesteps: torch.Tensor, cond: B.Cond, batch: dict[str, Any]) -> Any:
        return B.controlnet_residuals(bb, controlnet, noisy, timesteps, cond, batch["control"], scale, guidance)

    return residuals


def validate(config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]) -> Validation:
    """As text-to-image validation, with the ControlNet guiding the held-out loss."""
    return text_to_image.validate(
        config, bb, trained, data, validation, guide(config, bb, trained.modules["controlnet"])
    )


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    trained.modules["controlnet"].save_pretrained(out_dir / "controlnet")
    return {"controlnet": str(out_dir / "controlnet")}


CONTROLNET = register(
    Method(
        name="controlnet",
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=text_to_image.dataset,
        validate=validate,
        section=("controlnet", ControlNetConfig),
        describe="a ControlNet beside the frozen denoiser",
    )
)
