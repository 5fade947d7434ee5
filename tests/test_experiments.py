"""The shipped experiment configs: every one is valid, and every tiny one trains on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffbase.config import configs_dir, load_config
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli, train_tiny

EXPERIMENTS = sorted((configs_dir() / "experiments").glob("*.yaml"))


def test_there_is_an_experiment_for_each_family_and_method() -> None:
    names = {p.stem for p in EXPERIMENTS}
    for family in ("sd15", "sdxl", "sd35_large", "flux1_dev", "flux2_dev", "flux2_klein_4b"):
        for method in ("lora", "full_finetune", "dreambooth", "controlnet"):
            if method == "controlnet" and family.startswith("flux2"):
                continue  # diffusers has no FLUX.2 ControlNet model
            assert f"{family}_{method}" in names
    assert len(TINY_EXPERIMENTS) == 28  # with seed_example: the design document's own example experiment


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_full_size_experiments_are_valid_and_ask_for_weights(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    assert not config.model.variant.startswith("tiny") and config.training.method in path.stem
    assert config.model.pretrained_path is None and config.hardware.mixed_precision == "bf16"
    if path.stem == "sd15_lora":  # no weights given: one clear line, not a random 1B-parameter model
        code, _, err = run_cli("train", str(path), f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}")
        assert code == 2 and err.startswith("error: model.pretrained_path: required for sd15")


@pytest.mark.parametrize("path", TINY_EXPERIMENTS, ids=[p.stem for p in TINY_EXPERIMENTS])
def test_tiny_experiments_train(path: Path, tmp_path: Path) -> None:
    code, out, err = train_tiny(path, tmp_path, 2)
    assert code == 0, err
    assert "trained 2 steps" in out
    assert (tmp_path / "exports.json").exists() and (tmp_path / "validation" / "step-000002.png").exists()
