"""Latent tiles and their blending weights for tiled sampling (MultiDiffusion-style fusion).

Tiles are placed on the latent grid in even units (FLUX packs 2x2 latents into a token), overlapping by
at least `overlap`; the last tile in a row or column is aligned to the far edge. Each tile's weight ramps
linearly from its edges over the overlap, except along the image's own border, so the fused prediction
is a smooth average where tiles overlap and each tile's own elsewhere. One tile covering the image has
weight 1 everywhere, so fusing it changes nothing (plain img2img).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    h: int
    w: int

    def cut(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[..., self.y : self.y + self.h, self.x : self.x + self.w]


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis (even numbers), covering `length` with tiles of `tile`."""
    if length <= tile:
        return [0]
    stride = max(2, (tile - overlap) // 2 * 2)
    out = list(range(0, length - tile, stride))
    return out + [length - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles over a (height, width) latent grid; `tile` and `overlap` in latent units."""
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in starts(height, th, overlap) for x in starts(width, tw, overlap)]


def ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1 in the middle, falling linearly to 1/(overlap+1) over `overlap` cells at an edge inside the image."""
    w = torch.ones(length)
    if overlap <= 0:
        return w
    steps = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    n = min(overlap, length)
    if not at_start:
        w[:n] = torch.minimum(w[:n], steps[:n])
    if not at_end:
        w[-n:] = torch.minimum(w[-n:], steps[:n].flip(0))
    return w


def tile_weight(t: Tile, height: int, width: int, overlap: int) -> torch.Tensor:
    """(h, w) blending weight of tile `t` on a (height, width) grid."""
    wy = ramp(t.h, overlap, t.y == 0, t.y + t.h == height)
    wx = ramp(t.w, overlap, t.x == 0, t.x + t.w == width)
    return wy[:, None] * wx[None, :]


def fuse(parts: list[tuple[Tile, torch.Tensor]], shape: tuple[int, ...], overlap: int) -> torch.Tensor:
    """The weighted average of per-tile tensors (B, C, h, w) on the full grid `shape` (B, C, H, W)."""
    total = torch.zeros(shape, dtype=torch.float32, device=parts[0][1].device)
    norm = torch.zeros(shape[-2:], dtype=torch.float32, device=total.device)
    for t, value in parts:
        w = tile_weight(t, shape[-2], shape[-1], overlap).to(total.device)
        total[..., t.y : t.y + t.h, t.x : t.x + t.w] += value.float() * w
        norm[t.y : t.y + t.h, t.x : t.x + t.w] += w
    return total / norm
