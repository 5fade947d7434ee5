"""(low-res, high-res) training pairs from any image: the high-res crop, degraded the way real low-res
images are (downscaled, blurred, noisy, JPEG-compressed), then brought back to the crop's size with
Lanczos, as the upscaler's first step brings its input."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter


@dataclass
class Degradation:
    scales: list[float] = field(default_factory=lambda: [2.0, 4.0])  # downscale factor range
    blur: list[float] = field(default_factory=lambda: [0.0, 1.5])  # Gaussian blur radius range, low-res pixels
    noise: list[float] = field(default_factory=lambda: [0.0, 0.03])  # Gaussian noise std range, 0-1 units
    jpeg: list[int] = field(default_factory=lambda: [40, 95])  # JPEG quality range


def degrade(hr: Image.Image, d: Degradation, rng: random.Random) -> Image.Image:
    w, h = hr.size
    factor = rng.uniform(*d.scales)
    small = hr.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BICUBIC)
    radius = rng.uniform(*d.blur)
    if radius > 0:
        small = small.filter(ImageFilter.GaussianBlur(radius))
    std = rng.uniform(*d.noise)
    if std > 0:
        arr = np.asarray(small, dtype=np.float32) / 255
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, std, arr.shape).astype(np.float32)
        small = Image.fromarray((np.clip(arr + noise, 0, 1) * 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=rng.randint(*d.jpeg))
    small = Image.open(buffer).convert("RGB")
    return small.resize((w, h), Image.LANCZOS)


def degrade_batch(pixels: torch.Tensor, d: Degradation, rngs: list[random.Random]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the degraded batch, same shape."""
    from diffbase.data.datasets import to_pil, to_tensor

    return torch.stack([to_tensor(degrade(to_pil(p), d, rng)) for p, rng in zip(pixels, rngs, strict=True)])
