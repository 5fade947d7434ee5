"""Line plots drawn with PIL (no plotting library needed): loss curves people can look at."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]], title: str = "", size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """Each series a list of (x, y) points, drawn on shared axes with min/max labels and a legend."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    points = [p for s in series.values() for p in s]
    if not points:
        draw.text((w // 2 - 30, h // 2), "no data", fill="black")
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    draw.text((4, top), f"{y1:.4g}", fill="black")
    draw.text((4, h - bottom - 10), f"{y0:.4g}", fill="black")
    draw.text((left, h - bottom + 6), f"{x0:.4g}", fill="black")
    draw.text((w - right - 40, h - bottom + 6), f"{x1:.4g}", fill="black")
    for n, (name, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        if len(pts) > 1:
            draw.line([to_px(x, y) for x, y in pts], fill=colour, width=2)
        elif pts:
            x, y = to_px(*pts[0])
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((left + 10 + 120 * n, h - 18), f"— {name}", fill=colour)
    return img
