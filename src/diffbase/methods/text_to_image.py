"""What the image-and-caption methods (LoRA, full fine-tune, DreamBooth, ControlNet) share: the
standard diffusion loss, the image dataset, validation images and held-out loss, and generation
through the family's diffusers pipeline as their inference."""

from __future__ import annotations

from typing import Any

import torch

from diffbase.config import Config
from diffbase.methods.registry import Trained, Validation
from diffbase.training.metrics import TEXT_TO_IMAGE_METRICS

METRICS = TEXT_TO_IMAGE_METRICS  # the training.validation.metrics these methods compute


def freeze(bb: Any) -> None:
    for module in bb.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)


def loss(
    config: Config,
    bb: Any,
    trained: Trained,
    batch: dict[str, Any],
    cache: Any,
    step: int,
    guide: Any = None,
    reduce: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The standard diffusion loss (per sample with `reduce=False`), no extra terms."""
    from diffbase.training.loop import encode_batch
    from diffbase.training.step import diffusion_step_loss

    encoded, cond = encode_batch(bb, batch, cache, kept(config))
    value = diffusion_step_loss(
        bb,
        config.training.objective,
        encoded,
        cond,
        config.experiment.seed,
        step,
        guide=guide,
        weights=batch.get("weight"),
        reduce=reduce,
    )
    return value, {}


def kept(config: Config) -> tuple[str, ...]:
    """The batch entries the loss reads besides the latents: the loss mask (data.masked_loss) and a
    ControlNet's control image."""
    return ("mask", "control") if config.data.masked_loss else ("control",)


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    from diffbase.training.train import image_dataset

    return image_dataset(config, held_out)


def validate(
    config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any], guide: Any = None
) -> Validation:
    """Images from the validation prompts (a grid, and training.validation.metrics of them) and the held-out loss at
    fixed noise levels."""
    from diffbase.training.validation import image_metrics, validation_images, validation_loss

    held_out, cache = validation
    out = Validation()
    if config.training.validation.prompts:
        out.grid, images = validation_images(config, bb, data)
        out.metrics |= image_metrics(config, images, list(config.training.validation.prompts), data)
    if held_out is not None:
        out.metrics["val_loss"] = validation_loss(config, bb, held_out, cache, kept(config), guide)
    return out


def load(model: str, weights: list[str] | None = None, config: str | None = None, **runtime: Any) -> Any:
    """A pipeline from a folder (or a single file with its config folder), with LoRA files applied."""
    from diffbase.models.loading import load_model
    from diffbase.models.lora_loading import apply_loras

    pipe, spec = load_model(model, config=config, **runtime)
    apply_loras(pipe, spec, list(weights or []))
    return pipe, spec


def run(loaded: Any, inputs: dict[str, Any], settings: Any) -> Any:
    """One image for `settings` (a GenerateSettings; `inputs` is unused: text only)."""
    from diffbase.generate import generate

    pipe, spec = loaded
    return generate(pipe, spec, settings)
