"""Image grids with captions: results people look at are pictures, not only numbers."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[str] | None = None,
    cell: int = 128,
    header: Sequence[str] | None = None,
) -> Image.Image:
    """Rows of images scaled to `cell` pixels, an optional label left of each row and header above each column."""
    ncols = max(len(r) for r in rows)
    left = 110 if labels else 0
    top = 18 if header else 0
    grid = Image.new("RGB", (left + ncols * cell, top + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(header or []):
        draw.text((left + c * cell + 4, 3), text, fill="black")
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, top + r * cell + cell // 2 - 6), labels[r], fill="black")
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    return grid
