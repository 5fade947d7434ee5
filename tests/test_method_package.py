"""A method package from the test directory (tests/toy_method, added with DIFFBASE_METHODS): it trains
through the one loop, its command runs from `diffbase`, its tab appears in the web app and answers, with
no change to src/."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffbase.config import configs_dir
from tests.helpers import SHAPES, run_cli

BASE = configs_dir() / "experiments" / "tiny" / "sd15_lora.yaml"


def train_bias_only(out: Path) -> str:
    code, _, err = run_cli("train", str(BASE), "training.method=bias_only", "training.bias_only.scale=2.0",
                           "training.max_steps=2", f"data.train_path={SHAPES}", f"experiment.output_dir={out}",
                           "training.validation.steps=2", "--quiet")  # fmt: skip
    assert code == 0, err
    return json.loads((out / "exports.json").read_text())["biases"]


def test_a_method_package_trains_and_its_command_runs(tmp_path: Path, tiny_model, monkeypatch) -> None:
    monkeypatch.setenv("DIFFBASE_METHODS", "tests.toy_method")
    weights = train_bias_only(tmp_path / "run")
    code, out, _ = run_cli("--help")
    assert code == 0 and "bias-only" in out
    model = str(tiny_model("sd15"))
    code, _, err = run_cli("bias-only", "--model", model, "--weights", weights, "--prompt", "a red circle",
                           "--out", str(tmp_path / "out.png"), "--quiet")  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    from tests.toy_method.method import BIAS_ONLY

    pipe, spec = BIAS_ONLY.load(model, weights)
    saved, kept = load_file(weights), dict(getattr(pipe, spec.denoiser).named_parameters())
    assert saved and all(torch.equal(kept[name], value) for name, value in saved.items())
    code, _, err = run_cli("bias-only", "--model", model, "--weights", weights, "--prompt", "x", "--steps", "0",
                           "--out", str(tmp_path / "bad.png"))  # fmt: skip
    assert code == 2 and err.startswith("error: --steps") and not (tmp_path / "bad.png").exists()


def test_without_the_package_nothing_of_it_is_known(monkeypatch) -> None:
    monkeypatch.delenv("DIFFBASE_METHODS", raising=False)
    code, out, _ = run_cli("--help")
    assert code == 0 and "bias-only" not in out
    monkeypatch.setenv("DIFFBASE_METHODS", "tests.no_such_method")
    code, _, err = run_cli("--help")
    assert code == 2 and "DIFFBASE_METHODS: no module 'tests.no_such_method'" in err


def test_its_tab_appears_and_answers(tmp_path: Path, tiny_model, monkeypatch) -> None:
    pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")
    from gradio_client import Client

    from diffbase.serve import Defaults, Limits, serve

    monkeypatch.setenv("DIFFBASE_METHODS", "tests.toy_method")
    weights = train_bias_only(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve("127.0.0.1", port, Defaults(device="cpu", out=str(tmp_path / "serve")), Limits(), block=False)
    try:
        labels = [c["props"].get("label") for c in app.config["components"] if c.get("type") == "tabitem"]
        assert "Bias only" in labels and labels[-3:] == ["Train", "Training monitor", "Gallery"], labels
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out, status, _ = client.predict("a red circle", str(tiny_model("sd15")), weights, "32x32", 2, 0,
                                        api_name="/generate")  # (result, the tab's status line, the gallery)  # fmt: skip
        assert status == "" and Image.open(out).size == (32, 32)
    finally:
        app.close()


def test_its_benchmark_stage_runs(tmp_path: Path) -> None:
    """benchmarks/gpu.py --tiny finds the package's stage and reports it with a number."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DIFFBASE_METHODS": "tests.toy_method", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--tiny", "--stages", "bias_only",
                           "--out", str(tmp_path / "r.md")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| bias_only |")]
    assert any("s/step" in row and row.split("|")[3].strip()[0].isdigit() for row in rows), rows


def test_old_and_method_names_are_one_method(tmp_path: Path) -> None:
    """The try-on and upscale methods' old config names (and the try-on section's) read as the new ones; each
    editing method's config name is also its command."""
    from diffbase.config import load_config
    from diffbase.methods import get

    root = Path(__file__).resolve().parents[1]
    old = load_config(root / "configs" / "experiments" / "tryon_vton_sd15.yaml",
                      ["training.method=vton", "training.vton.variant=catvton"])  # fmt: skip
    assert old.training.method == "tryon" and old.training.tryon.variant == "catvton"
    assert get("vton") is get("tryon") and get("upscale_dino") is get("upscale")
    code, out, _ = run_cli("--help")
    assert code == 0 and "edit (kontext)" in out and "inpaint (fill)" in out and "dreamo (customize)" in out
