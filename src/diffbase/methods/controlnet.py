"""ControlNet training: a ControlNet initialised from the denoiser (as diffusers' examples do), the
denoiser frozen; exported as a diffusers folder. Validation images go through the family's
ControlNet pipeline. Control images come from the data (`control` per entry), or are computed for the
entries without one (training.controlnet.conditioning_type: canny, depth, pose; pose from keypoints files,
or from a local ViTPose model given as training.controlnet.pose_model; diffbase.data.controls)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.data import controls
from diffbase.data.controls import ConditioningType, ControlSettings
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
    # given: every entry's `control` image; canny, depth, pose: computed for entries without one (cached)
    conditioning_type: ConditioningType = "given"
    canny_low: int = 100  # cv2.Canny thresholds, as diffusers' ControlNet training examples use
    canny_high: int = 200
    depth_model: str | None = None  # depth: a local transformers depth-estimation folder (DPT, Depth Anything)
    pose_model: str | None = None  # pose: a local ViTPose folder, estimating keypoints where no JSON file is given

    def __post_init__(self) -> None:
        """Checked when the config is read, so a bad setting stops the run before any model loads."""
        if self.conditioning_type != "given":
            controls.check_settings(self.settings())

    def settings(self) -> ControlSettings:
        return ControlSettings(
            self.conditioning_type, self.canny_low, self.canny_high, self.depth_model, pose_model=self.pose_model
        )


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


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    """The image dataset, every entry with a control: its own, or (conditioning_type canny, depth, pose) one
    computed from its image or keypoints."""
    data = text_to_image.dataset(config, held_out, bb)
    if data is None:
        return None
    if config.training.controlnet.conditioning_type == "given":
        missing = next((r.image for r in data.records if r.control is None), None)
        if missing is not None:
            raise UserError(
                f"{missing}: no 'control' image in the metadata; give every entry one, or set "
                "training.controlnet.conditioning_type to canny, depth or pose to compute them"
            )
        return data
    add_computed_controls(config, data)
    return data


def add_computed_controls(config: Config, data: Any) -> None:
    """Controls for the entries without one, cached under data.cache_dir/controls (else
    experiment.output_dir/controls) so they are computed once: by the main process, the others then read."""
    from diffbase.training.loop import process_state

    c, d = config.training.controlnet, config.data
    root = Path(d.cache_dir) / "controls" if d.cache_dir else Path(config.experiment.output_dir) / "controls"
    jobs = controls.plan(data, c.settings(), root)  # every process checks (a missing keypoints file stops all)
    state = process_state(config)
    if state.is_main_process:
        computed, failed = controls.compute(jobs, c.settings(), state.device)
        if computed:
            print(f"controls: computed {computed} {c.conditioning_type} image(s) in {root / c.conditioning_type}")
    state.wait_for_everyone()
    if not state.is_main_process:  # nothing left to compute, unless the folder is not shared
        _, failed = controls.compute(jobs, c.settings(), state.device)
    controls.apply(data, jobs, failed)


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    trained.modules["controlnet"].save_pretrained(out_dir / "controlnet")
    return {"controlnet": str(out_dir / "controlnet")}


CONTROLNET = register(
    Method(
        name="controlnet",
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=dataset,
        validate=validate,
        metrics=text_to_image.METRICS,
        section=("controlnet", ControlNetConfig),
        describe="a ControlNet beside the frozen denoiser",
    )
)
