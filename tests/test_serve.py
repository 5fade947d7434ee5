"""The web UI's guards and the training monitor, without a browser (tests/test_web_ui.py drives one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbase.errors import UserError

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")


def test_uploads_are_refused_by_bytes_and_pixels_before_decoding(tmp_path: Path) -> None:
    from diffbase.serve import Limits, checked_image

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    assert checked_image(str(image), "person", Limits()).size == (64, 64)
    with pytest.raises(UserError, match="person: .* MB is more than the 0 MB limit"):
        checked_image(str(image), "person", Limits(max_bytes=1000))
    with pytest.raises(UserError, match="person: the image is 64x64, beyond the limit of 4000 pixels"):
        checked_image(str(image), "person", Limits(max_pixels=4000))
    with pytest.raises(UserError, match="garment: upload an image"):
        checked_image(None, "garment", Limits())


def test_monitor_reads_a_run_folder(tmp_path: Path) -> None:
    from diffbase.serve import loss_view

    rows = [{"step": s, "loss": 1 / s} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "validation").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "validation" / "step-000005.png")
    plot, grid, status = loss_view(str(tmp_path))
    assert plot.size[0] > 100 and grid.size == (20, 10) and status.startswith("step 5; 1 validation grid")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        loss_view(str(tmp_path / "nothing"))


def test_serve_binds_to_localhost_by_default() -> None:
    import argparse

    from diffbase.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert isinstance(args, argparse.Namespace) and args.host == "127.0.0.1"


def test_a_request_stops_at_its_time_limit_or_on_stop_and_the_next_one_runs() -> None:
    import time

    import gradio as gr

    from diffbase import progress
    from diffbase.serve import Limits, Models, Request, guarded

    models, request = Models(), Request(Limits(max_seconds=0.5))
    steps: list[int] = []

    def slow(n: int) -> str:
        for i in progress.bar(range(n), "work", show=False):
            steps.append(i)
            time.sleep(0.05)
        return "done"

    run = guarded(slow, models, request)
    with pytest.raises(gr.Error, match="ran past the 0.5 s limit"):
        run(1000)
    assert 0 < len(steps) < 1000 and not models.lock.locked()
    steps.clear()

    def stop_soon(n: int) -> str:
        for i in progress.bar(range(n), "work", show=False):
            if i == 3:
                request.cancel.set()  # what the Stop button does, from another thread
            steps.append(i)
        return "done"

    with pytest.raises(gr.Error, match="stopped"):
        guarded(stop_soon, models, request)(1000)
    assert len(steps) == 4
    assert guarded(slow, models, request)(2) == "done"  # the next request starts with a clear flag and clock


def test_a_diffusers_pipeline_stops_between_steps(tiny_model) -> None:
    from diffbase import progress
    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.loading import load_pipeline

    pipe, spec = load_pipeline(tiny_model("flux1"))
    progress.pipeline(pipe, "generate", show=False)
    calls = []

    def reason() -> str | None:
        calls.append(1)
        return "stopped" if len(calls) > 2 else None

    with progress.stop_when(reason), pytest.raises(progress.Cancelled, match="stopped"):
        generate(pipe, spec, GenerateSettings(prompt="a cat", steps=10, height=32, width=32))
    assert len(calls) == 3  # two steps ran, the third was refused


def test_errors_name_the_field_not_the_flag() -> None:
    from diffbase.serve import relabel

    labels = {"--weights": "trained attention weights", "--model": "SD1.5 model folder"}
    assert relabel("--weights: x.bin is not a PyTorch weights file", labels) == (
        "trained attention weights: x.bin is not a PyTorch weights file"
    )
    assert relabel("--model: try-on runs on an SD1.5 folder", labels).startswith("SD1.5 model folder: try-on")
    assert relabel("steps: expected a whole number", labels) == "steps: expected a whole number"
