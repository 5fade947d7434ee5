"""The optimizer a config names, from the package that maintains it: AdamW (torch), 8-bit AdamW and Lion
(bitsandbytes), Lion (lion-pytorch), Prodigy (prodigyopt), Adafactor (transformers), schedule-free AdamW
(schedulefree: validation and exports use its averaged weights). A package that is not installed is a one-line
error naming what to install.

torch's AdamW runs fused (one kernel for every parameter, `fused=True`) wherever torch has that kernel for the
parameters' device (CUDA and the CPU in torch 2.13): the same update as the default multi-tensor one to float
rounding, and the optimizer that can skip a step on the device (`skips_on_device`), which the loop's non-finite
check without a host read needs."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
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
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}


def arguments(kind: str, lr: float, o: Any, warmup_steps: int = 0) -> dict[str, Any]:
    """Each optimizer's own spelling of the config's settings (Lion's betas default to (0.9, 0.99); Prodigy
    expects lr near 1.0, a multiplier of the step size it finds; Adafactor here takes the given lr, not its own
    relative step)."""
    betas = tuple(o.betas)
    if kind in ("lion", "lion8bit"):
        return {"lr": lr, "betas": betas, "weight_decay": o.weight_decay}
    if kind == "adamw_schedulefree":  # its own schedule: the warm-up is its, the lr constant (see make_scheduler)
        return {"lr": lr, "betas": betas, "eps": o.eps, "weight_decay": o.weight_decay,
                "warmup_steps": warmup_steps}  # fmt: skip
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


def fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused Adam(W) kernel for every one of these parameters (floating point, on a device
    torch lists for fused optimizers)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # moved in another torch: the two this project trains on
        devices = {"cuda", "cpu"}
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def fused_argument(kind: str, setting: bool | None, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """`fused=True` for torch's AdamW where supported, unless `training.optimizer.fused: false`; `true` where it
    is not supported is a one-line error. Other optimizers have no such switch."""
    if kind != "adamw" or setting is False:
        return {}
    if fused_supported(params):
        return {"fused": True}
    if setting is True:
        devices = sorted({p.device.type for p in params})
        raise UserError(f"training.optimizer.fused: torch has no fused AdamW for these parameters (on {devices}); "
                        "set it to null (auto) or false")  # fmt: skip
    return {}


def skips_on_device(optimizer: Any) -> bool:
    """Whether the optimizer skips a step itself when told on the device (torch's fused Adam / AdamW and the
    others GradScaler drives that way: `found_inf` set on it, a 0-d float tensor, 1.0 to skip). With found_inf
    1.0 the fused kernel leaves the weights and moments as they are and takes back its step count."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds it
    return bool(getattr(inner, "_step_supports_amp_scaling", False))


def make_optimizer(
    params: list[torch.nn.Parameter], config: Config, groups: list[dict[str, Any]] | None = None, warmup: int = 0
) -> torch.optim.Optimizer:
    """`groups`: parameter groups with their own lr (a text encoder's), else one group of `params`. `warmup`:
    the warm-up steps an optimizer with its own schedule takes over."""
    t = config.training
    kind = t.optimizer.type
    every = [p for g in groups for p in g["params"]] if groups else list(params)
    kwargs = arguments(kind, t.learning_rate, t.optimizer, warmup) | fused_argument(kind, t.optimizer.fused, every)
    optimizer = optimizer_class(kind)(groups or params, **kwargs)
    set_mode(optimizer, "train")
    return optimizer


def schedule_free(config: Config) -> bool:
    return config.training.optimizer.type == "adamw_schedulefree"


def set_mode(optimizer: Any, mode: str) -> None:
    """A schedule-free optimizer trains on one sequence of weights and is evaluated on another (their average):
    `train` / `eval` switch the parameters between them. A no-op for every other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds it
    switch = getattr(inner, mode, None)
    if callable(switch) and "train_mode" in inner.param_groups[0]:
        switch()


@contextlib.contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """The parameters a schedule-free optimizer is evaluated on, for the duration (validation, a mid-run export)."""
    set_mode(optimizer, "eval")
    try:
        yield
    finally:
        set_mode(optimizer, "train")
