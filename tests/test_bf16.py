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


FLUX_LORA = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
SD15_DREAMBOOTH = next(p for p in TINY_EXPERIMENTS if p.name == "sd15_dreambooth.yaml")


@pytest.mark.parametrize(
    ("path", "overrides"),
    [
        (FLUX_LORA, ["training.lora.type=dora"]),
        (FLUX_LORA, ["training.lora.type=rslora"]),
        (FLUX_LORA, ["training.lora.type=lokr"]),
        (FLUX_LORA, ["training.lora.type=loha"]),
        (FLUX_LORA, ["training.lora.train_text_encoder=true", "training.lora.text_encoder_lr=1e-3"]),
        (FLUX_LORA, ["training.export_every=1", "training.optimizer.type=prodigy", "training.learning_rate=1.0"]),
        (SD15_DREAMBOOTH, ["training.dreambooth.train=full", "training.dreambooth.train_text_encoder=true"]),
    ],
    ids=["dora", "rslora", "lokr", "loha", "text-encoder", "export-every", "dreambooth-full"],
)
def test_trainer_features_in_bf16(path: Path, overrides: list[str], tmp_path: Path) -> None:
    """The adapters, text-encoder training, mid-run exports and DreamBooth's full weights as real configs run them."""
    code, _, err = train_tiny(path, tmp_path, 2, *BF16, *overrides)
    assert code == 0, err
    assert all(math.isfinite(v) for v in json.loads((tmp_path / "losses.json").read_text()))
    assert (tmp_path / "validation" / "step-000002.png").exists()
    for path_ in json.loads((tmp_path / "exports.json").read_text()).values():
        files = [Path(path_)] if path_.endswith(".safetensors") else sorted(Path(path_).glob("*.safetensors"))
        for file in files:
            weights = load_file(str(file))
            assert weights and all(t.float().isfinite().all() for t in weights.values())
    if "training.export_every=1" in overrides:
        assert (tmp_path / "exports" / "step-000001" / "exports.json").is_file()


def test_lycoris_init_from_in_bf16(tmp_path: Path) -> None:
    code, _, err = train_tiny(FLUX_LORA, tmp_path / "a", 2, *BF16, "training.lora.type=lokr")
    assert code == 0, err
    source = tmp_path / "a" / "lora" / "lora_lycoris.safetensors"
    code, _, err = train_tiny(FLUX_LORA, tmp_path / "b", 2, *BF16, "training.lora.type=lokr",
                              f"training.lora.init_from={source}")  # fmt: skip
    assert code == 0, err
