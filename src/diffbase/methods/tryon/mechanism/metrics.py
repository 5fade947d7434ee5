"""Try-on metrics on images in [-1, 1]: masked-region L1, PSNR, SSIM (torchmetrics), and the colour/pattern
accuracy of the garment area used by the demo."""

from __future__ import annotations

import torch


def masked_l1(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image: mean absolute error over the masked pixels (all channels), in [-1, 1] units."""
    m = mask.expand_as(result).float()
    return ((result - target).abs() * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def psnr(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] intensities."""
    mse = (((result - target) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image SSIM of images in [-1, 1], by torchmetrics (Gaussian window 11, sigma 1.5)."""
    from diffbase.metrics.scores import ssim as ssim01

    return ssim01((result.float().clamp(-1, 1) + 1) / 2, (target.float().clamp(-1, 1) + 1) / 2)
