"""Training metrics: metrics.jsonl always, the trackers of `logging.report_to` (TensorBoard, W&B, MLflow),
and a loss plot PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffbase.training.trackers import Outcome, finish_all, log_image, start_trackers

if TYPE_CHECKING:
    from diffbase.config import Config


# training.validation.metrics, by what they compare (a method's Method.metrics names the ones it computes)
TEXT_TO_IMAGE_METRICS = ("clip_t", "fid", "kid")  # of the validation prompts' images
PAIRED_METRICS = ("ssim", "psnr", "lpips")  # of held-out results against their ground truth
REFERENCE_METRICS = ("clip_i", "dino", "clip_t")  # of held-out results against their references and captions


def metric_names() -> list[str]:
    """Their metrics.jsonl names, in a fixed order (val_clip_t, val_fid, ...)."""
    names = (*TEXT_TO_IMAGE_METRICS, *PAIRED_METRICS, *REFERENCE_METRICS)
    return [f"val_{m}" for m in dict.fromkeys(names)]


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
    """Scalars and images by step. Only the main process writes, and only it starts the trackers (`config`'s
    logging.report_to; without a config, TensorBoard where installed). `close` ends their runs."""

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int = 0, config: Config | None = None) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.path = out_dir / "metrics.jsonl"
        self.trackers: list[Any] = []
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run drops what was logged after its checkpoint
            from diffbase.io import write_text_atomic

            kept = [json.dumps(row) for row in self.history() if row["step"] <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.trackers = start_trackers(config, out_dir, resume_step)

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def image(self, step: int, tag: str, image: Any) -> None:
        for tracker in self.trackers:
            log_image(tracker, tag, image, step)

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
        self.plot_image_metrics(rows)
        return save_png_atomic(image, self.out_dir / "loss.png")

    def plot_image_metrics(self, rows: list[dict[str, Any]]) -> Path | None:
        """validation_metrics.png: each metric of training.validation.metrics by step, one panel each (their scales
        differ)."""
        from PIL import Image

        from diffbase.io import save_png_atomic
        from diffbase.plot import line_plot

        names = [n for n in metric_names() if any(n in r for r in rows)]
        if not names:
            return None
        panels = [line_plot({n: [(r["step"], r[n]) for r in rows if n in r]}, title=n) for n in names]
        sheet = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
        for i, panel in enumerate(panels):
            sheet.paste(panel, (0, i * panels[0].height))
        return save_png_atomic(sheet, self.out_dir / "validation_metrics.png")

    def close(self, outcome: Outcome = "finished") -> None:
        """End the trackers' runs (marked failed or killed where the run did not finish); once."""
        trackers, self.trackers = self.trackers, []
        finish_all(trackers, outcome)
