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

FAMILIES = ("sd15", "sdxl", "sd3", "flux1")
CLASSES = {
    "sd15": "ControlNetModel",
    "sdxl": "ControlNetModel",
    "sd3": "SD3ControlNetModel",
    "flux1": "FluxControlNetModel",
}


@dataclass
class ControlNetConfig:
    conditioning_scale: float = 1.0
    num_layers: int | None = None  # None: the family default for a ControlNet made from the denoiser
    num_single_layers: int | None = None
    pretrained_path: str | None = None


def make_controlnet(denoiser: torch.nn.Module, family: str, c: ControlNetConfig) -> torch.nn.Module:
    import diffusers

    if family not in FAMILIES:
        raise UserError(
            f"training.method: controlnet is available for {list(FAMILIES)}; diffusers "
            f"0.42 has no ControlNet model for {family}"
        )
    if c.pretrained_path:
        return getattr(diffusers, CLASSES[family]).from_pretrained(c.pretrained_path, local_files_only=True)
    if family in ("sd15", "sdxl"):
        return diffusers.ControlNetModel.from_unet(denoiser)
    if family == "sd3":
        return diffusers.SD3ControlNetModel.from_transformer(
            denoiser,
            num_layers=c.num_layers or max(1, min(12, denoiser.config.num_layers - 1)),
            num_extra_conditioning_channels=0,
        )
    config = denoiser.config
    return diffusers.FluxControlNetModel.from_transformer(
        denoiser,
        num_layers=c.num_layers or min(4, config.num_layers),
        num_single_layers=c.num_single_layers or min(10, config.num_single_layers),
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )


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
