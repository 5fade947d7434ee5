"""Every tiny experiment trains, validates and exports in bf16, as the real configs run (bf16 weights,
bf16 mixed precision). An fp32-only suite once hid that every bf16 run crashed at its first validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import TINY_EXPERIMENTS, run_cli, train_tiny

BF16 = ["model.dtype=bfloat16", "hardware.mixed_precision=bf16"]


@pytest.mark.parametrize("path", TINY_EXPERIMENTS, ids=[p.stem for p in TINY_EXPERIMENTS])
def test_tiny_experiments_train_validate_and_export_in_bf16(path: Path, tmp_path: Path) -> None:
    code, _, err = train_tiny(path, tmp_path, 2, *BF16, "training.validation.loss_split=0.25")
    assert code == 0, err
    assert all(math.isfinite(v) for v in json.loads((tmp_path / "losses.json").read_text()))
    assert (tmp_path / "validation" / "step-000002.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("val_loss", math.nan)) for r in rows)  # held-out loss, in bf16 too
    exports = json.loads((tmp_path / "exports.json").read_text())
    assert exports
    if "kohya" in exports:  # LoRA files hold finite weights, written from the trained fp32 copies
        for file in (exports["diffusers"], exports["kohya"]):
            weights = load_file(file)
            assert weights and all(t.isfinite().all() for t in weights.values())


def test_try_on_and_dreamfit_toys_train_in_bf16(tmp_path: Path) -> None:
    from diffbase.data.synthetic import write_dataset

    data = tmp_path / "synth"
    write_dataset(data, 24, 6, seed=0, size=(32, 32))
    zoo = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights"
    for config, model in (("demo/tryon.yaml", "sd15-toy"), ("toy/flux1_dreamfit.yaml", "flux1-toy")):
        out = tmp_path / model
        code, _, err = run_cli(
            "train",
            f"configs/experiments/{config}",
            *BF16,
            f"model.pretrained_path={zoo / model}",
            f"data.train_path={data}",
            f"experiment.output_dir={out}",
            "training.max_steps=2",
            "training.batch_size=2",
            "training.checkpoint_every=0",
            "training.validation.loss_split=0.25",
        )
        assert code == 0, err
        assert all(math.isfinite(v) for v in json.loads((out / "losses.json").read_text()))
        assert json.loads((out / "exports.json").read_text())
