"""Try-on metrics on images in [-1, 1]: masked-region L1, PSNR and SSIM (computed here, no weights),
and the colour/pattern accuracy of the garment area used by the demo."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_l1(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image: mean absolute error over the masked pixels (all channels), in [-1, 1] units."""
    m = mask.expand_as(result).float()
    return ((result - target).abs() * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def psnr(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] intensities."""
    mse = (((result - target) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image: the mean SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5) on [0, 1] intensities,
    averaged over channels; the window is cut to the image for small images."""
    x, y = (result.double() + 1) / 2, (target.double() + 1) / 2
    size = min(11, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    c = x.shape[1]
    w = _gaussian(size).double().to(x.device).expand(c, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()
