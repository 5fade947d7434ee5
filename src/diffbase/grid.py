"""Image grids with captions: results people look at are pictures, not only numbers. Text is set in
Pillow's bundled FreeType font at a readable size and wrapped to its column, never cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13


def font(size: int = FONT_SIZE) -> Any:
    return ImageFont.load_default(size=size)


def wrap(text: str, width: float, face: Any) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is split by characters."""
    lines: list[str] = []
    for word in text.split():
        split = False
        while len(word) > 1 and face.getlength(word) > width:
            cut = max((i for i in range(1, len(word)) if face.getlength(word[:i]) <= width), default=1)
            lines.append(word[:cut])
            word, split = word[cut:], True
        if lines and not split and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[str] | None = None,
    cell: int = 128,
    header: Sequence[str] | None = None,
) -> Image.Image:
    """Rows of images scaled to `cell` pixels, an optional label left of each row and header above each
    column, both wrapped to fit."""
    face = font()
    line = int(face.getbbox("Ag")[3]) + 3
    ncols = max(len(r) for r in rows)
    left = 120 if labels else 0
    heads = [wrap(text, cell - 6, face) for text in (header or [])]
    top = (max(len(h) for h in heads) * line + 6) if heads else 0
    grid = Image.new("RGB", (left + ncols * cell, top + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(heads):
        for k, text in enumerate(lines):
            draw.text((left + c * cell + 3, 3 + k * line), text, fill="black", font=face)
    for r, row in enumerate(rows):
        if labels:
            lines = wrap(labels[r], left - 8, face)
            y = top + r * cell + cell // 2 - len(lines) * line // 2
            for k, text in enumerate(lines):
                draw.text((4, y + k * line), text, fill="black", font=face)
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    return grid


def side_by_side(named: dict[str, Image.Image], cell: int = 192) -> Image.Image:
    """One row with a header per image (person | garment | result): what a single result is judged by."""
    return image_grid([list(named.values())], header=list(named), cell=cell)
