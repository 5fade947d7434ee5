"""Training metrics: metrics.jsonl always, TensorBoard when it is installed, and a loss plot PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl; a last line cut short (a killed run, or one still being written) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class MetricsLog:
    """Scalars and images by step. Only the main process writes."""

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer: Any = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run drops what was logged after its checkpoint
            from diffbase.io import write_text_atomic

            kept = [json.dumps(row) for row in self.history() if row["step"] <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 or None)
        except ImportError:  # tensorboard is optional; metrics.jsonl has the same numbers
            self.writer = None

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, step: int, tag: str, image: Any) -> None:
        if self.enabled and self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def history(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def losses(self) -> list[float]:
        """The training loss of every step logged, across resumes."""
        return [row["loss"] for row in self.history() if "loss" in row]

    def plot(self) -> Path | None:
        """loss.png: training loss (and validation loss where measured) against steps."""
        if not self.enabled:
            return None
        from diffbase.io import save_png_atomic
        from diffbase.plot import line_plot

        rows = self.history()
        series = {
            name: [(r["step"], r[name]) for r in rows if name in r] for name in ("loss", "val_loss", "val_masked_l1")
        }
        image = line_plot({k: v for k, v in series.items() if v}, title="loss by step")
        return save_png_atomic(image, self.out_dir / "loss.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
