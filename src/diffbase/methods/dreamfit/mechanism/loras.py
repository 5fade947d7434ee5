"""DreamFit's LoRAs as trainable parameters, in the official key layout when saved (the training
itself is the `dreamfit` method, diffbase.methods.dreamfit.method)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffbase.methods.dreamfit.mechanism.checkpoint import (
    DOUBLE,
    NETWORK_ALPHA,
    SINGLE,
    Dims,
    LoraPair,
    diffusers_name,
    save_official,
)


class DreamFitLoras(torch.nn.Module):
    """Every DreamFit LoRA as parameters (down random, up zero: training starts at the plain model)."""

    def __init__(self, dims: Dims, rank: int, seed: int = 0, device: str = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        meta = device == "meta"  # shapes only (memory accounting): no random numbers drawn
        self.downs, self.ups = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        self.names: dict[str, str] = {}  # parameter key -> diffusers name
        for kind, count, names in (("double", dims.double, DOUBLE), ("single", dims.single, SINGLE)):
            for i in range(count):
                for name in names:
                    fan_in, fan_out = dims.shapes(kind, name)
                    r = rank * (2 if name == "processor.ref_proj_lora" else 1)
                    key = f"{kind}_blocks.{i}.{name}".replace(".", "__")
                    down = torch.empty(r, fan_in, device="meta") if meta else torch.randn(r, fan_in, generator=g) / r
                    self.downs[key] = torch.nn.Parameter(down)
                    self.ups[key] = torch.nn.Parameter(torch.zeros(fan_out, r, device=device))
                    self.names[key] = diffusers_name(kind, i, name)

    def forward(self, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`run(*args, **kwargs)`: what uses the LoRAs. They act from inside the frozen transformer (its
        processors and forward hooks), never through a forward of their own, so the training step runs its
        passes inside this call; a DDP wrapper around this module then reduces their gradients."""
        return run(*args, **kwargs)

    def pairs(self) -> dict[str, LoraPair]:
        out = {}
        for key, name in self.names.items():
            alpha = NETWORK_ALPHA * (2 if name.endswith("processor.ref_proj_lora") else 1)
            out[name] = LoraPair(self.downs[key], self.ups[key], alpha / self.downs[key].shape[0])
        return out

    def save_official(self, path: Path) -> Path:
        return save_official({k.replace("__", "."): (self.downs[k], self.ups[k]) for k in self.names}, path)
