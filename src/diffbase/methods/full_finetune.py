"""Full fine-tuning of the denoiser; exported as a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffbase.config import Config
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, register


def prepare(bb: Any, config: Config) -> Trained:
    text_to_image.freeze(bb)
    bb.denoiser.requires_grad_(True)
    return Trained({"denoiser": bb.denoiser}, list(bb.denoiser.parameters()))


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    folder = out_dir / bb.spec.denoiser
    bb.denoiser.save_pretrained(folder)
    return {"denoiser": str(folder)}


FULL_FINETUNE = register(
    Method(
        name="full_finetune",
        prepare=prepare,
        loss=text_to_image.loss,
        export=export,
        dataset=text_to_image.dataset,
        validate=text_to_image.validate,
        metrics=text_to_image.METRICS,
        load=text_to_image.load,
        run=text_to_image.run,
        describe="every denoiser weight trains",
    )
)
