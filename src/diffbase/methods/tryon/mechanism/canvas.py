"""The try-on canvas: person on top, garment below (concatenated along height), in pixels and latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffbase.models import backbone as B


def stack(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    return torch.cat([top, bottom], dim=-2)


def top_half(canvas: torch.Tensor) -> torch.Tensor:
    return canvas[..., : canvas.shape[-2] // 2, :]


def masked_person(person: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The person with the garment area set to 0 (mid grey in [-1, 1]), as CatVTON does."""
    return person * (mask < 0.5)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The person's mask at latent resolution (nearest)."""
    return F.interpolate(mask.float(), size=latent_hw, mode="nearest")


def mask_canvas(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The person's mask at latent resolution (nearest), over zeros for the garment half."""
    small = latent_mask(mask, latent_hw)
    return stack(small, torch.zeros_like(small))


def sample_latents(bb: B.Backbone, pixels: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """VAE posterior samples, scaled, one generator per sample (drawn in batch order; None: the global one)."""
    return sample_posterior(bb, *B.encode_distribution(bb, pixels), generators)


def sample_posterior(
    bb: B.Backbone, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Samples of a (cached or just computed) posterior, scaled; the same draws as `sample_latents`."""
    z = torch.stack(
        [m + s * torch.randn(m.shape, generator=g).to(m) for m, s, g in zip(mean, std, generators, strict=True)]
    )
    return B.normalize(bb, z.float())


def unet_input(variant: str, noisy: torch.Tensor, masks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Channel order as CatVTON: noisy (4), mask (1, catvton only), masked canvas (4)."""
    parts = [noisy, masks.to(noisy), cond] if variant == "catvton" else [noisy, cond]
    return torch.cat(parts, dim=1)
