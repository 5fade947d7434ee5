"""Line plots with matplotlib (Agg, no display): loss curves people can look at."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]], title: str = "", size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """Each series a list of (x, y) points, drawn on shared axes with a legend; returns an RGB image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    try:
        drawn = False
        for name, points in series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name, marker="o" if len(points) == 1 else None, linewidth=1.5)
                drawn = True
        if drawn:
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
