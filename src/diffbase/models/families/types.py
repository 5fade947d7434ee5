"""The types a family's functions and the backbone interface share: the text conditioning, what a method
adds to a denoiser call, and the backbone (a family spec and its pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffbase.models.families.record import Family, FamilySpec

Cond = dict[str, torch.Tensor]


@dataclass
class Conditioning:
    """What a method adds to one denoiser call beyond the noisy latents and the text; `denoise` builds
    the call from it for every family, so methods never touch a pipeline's packing or id helpers.

    - `tokens` / `token_ids`: extra image tokens (packed reference latents, see `pack` and
      `reference_ids`) appended after the noisy tokens; the output is sliced back to the noisy
      tokens (FLUX.1 Kontext, FLUX.2 reference images).
    - `channels`: extra input channels on the latent grid (B, C, H, W), joined to the noisy latents
      along the channels (packed the same way for FLUX: FLUX.1 Fill's masked latent and mask).
    - `residuals`: ControlNet outputs, passed to the denoiser in its dtype.
    """

    tokens: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    residuals: dict[str, Any] | None = None


@dataclass
class Backbone:
    spec: FamilySpec
    pipe: Any
    controlnet: Any = None  # set while a ControlNet is trained on this backbone
    forward: Any = None  # the denoiser as wrapped for training (DDP/FSDP): calls go through it so gradients sync
    adapters: dict[str, Any] = field(default_factory=dict)  # modules a method adds beside the denoiser (DreamFit)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.spec.denoiser)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def behaviour(self) -> Family:
        """The family's behaviour (models/families/<family>.py)."""
        from diffbase.models.families import get

        return get(self.spec.family)

    @property
    def device(self) -> torch.device:
        """Where the denoiser computes: its weights' device, or with offload hooks the device they bring it to."""
        from diffbase.models.placement import compute_device

        return compute_device(self.pipe, self.denoiser)
