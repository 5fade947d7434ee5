"""`training.method: bias_only`: the denoiser's biases train, scaled by `training.bias_only.scale` in the loss;
the export is one safetensors file of biases; inference loads the base model and sets them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffbase.config import Config
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, register


@dataclass
class BiasConfig:
    """`training.bias_only.*`."""

    scale: float = 1.0


def is_bias(name: str) -> bool:
    return name.endswith(".bias")


def prepare(bb: Any, config: Config) -> Trained:
    text_to_image.freeze(bb)
    biases = [p for n, p in bb.denoiser.named_parameters() if is_bias(n)]
    for p in biases:
        p.requires_grad_(True)
    return Trained({"denoiser": bb.denoiser}, biases, state_dict=bias_state)


def bias_state(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    module = trained.modules["denoiser"]
    return {"denoiser": {n: p.detach() for n, p in module.named_parameters() if is_bias(n)}}


def loss(config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int) -> Any:
    value, _ = text_to_image.loss(config, bb, trained, batch, cache, step)
    norm = torch.stack([p.norm() for p in trained.trainable]).sum()
    return value * config.training.bias_only.scale, {"unscaled": value.detach(), "bias_norm": norm}


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    path = out_dir / "bias" / "biases.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bias_state(trained)["denoiser"].items()}, str(path))
    return {"biases": str(path)}


def load(model: str, weights: str, **runtime: Any) -> Any:
    """The base pipeline with the trained biases set."""
    pipe, spec = text_to_image.load(model, **runtime)
    denoiser = getattr(pipe, spec.denoiser)
    denoiser.load_state_dict(load_file(weights), strict=False)
    return pipe, spec


BIAS_ONLY = register(
    Method(
        name="bias_only", prepare=prepare, loss=loss, export=export, dataset=text_to_image.dataset,
        validate=text_to_image.validate, section=("bias_only", BiasConfig), load=load, run=text_to_image.run,
        describe="the denoiser's biases alone (a method package from outside diffbase)",
    )
)  # fmt: skip
