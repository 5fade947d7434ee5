"""The optimizer a config names, from the package that maintains it: AdamW (torch), 8-bit AdamW and Lion
(bitsandbytes), Lion (lion-pytorch), Prodigy (prodigyopt), Adafactor (transformers). A package that is not
installed is a one-line error naming what to install."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from diffbase.config import Config
from diffbase.errors import UserError

# type -> (module, attribute, pip package); the keyword arguments each takes are in `arguments`
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}


def arguments(kind: str, lr: float, o: Any) -> dict[str, Any]:
    """Each optimizer's own spelling of the config's settings (Lion's betas default to (0.9, 0.99); Prodigy
    expects lr near 1.0, a multiplier of the step size it finds; Adafactor here takes the given lr, not its own
    relative step)."""
    betas = tuple(o.betas)
    if kind in ("lion", "lion8bit"):
        return {"lr": lr, "betas": betas, "weight_decay": o.weight_decay}
    if kind == "adafactor":
        return {"lr": lr, "weight_decay": o.weight_decay, "relative_step": False, "scale_parameter": False,
                "warmup_init": False}  # fmt: skip
    return {"lr": lr, "betas": betas, "eps": o.eps, "weight_decay": o.weight_decay}


def optimizer_class(kind: str) -> Callable[..., torch.optim.Optimizer]:
    if kind not in OPTIMIZERS:
        raise UserError(f"training.optimizer.type: expected one of {', '.join(OPTIMIZERS)}, got '{kind}'")
    module, attribute, package = OPTIMIZERS[kind]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise UserError(f"training.optimizer.type: {kind} needs {package} (pip install {package})") from None


def make_optimizer(
    params: list[torch.nn.Parameter], config: Config, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """`groups`: parameter groups with their own lr (a text encoder's), else one group of `params`."""
    t = config.training
    kind = t.optimizer.type
    return optimizer_class(kind)(groups or params, **arguments(kind, t.learning_rate, t.optimizer))
