"""Behaviour pinned across redesigns: every tiny experiment, the try-on and DreamFit toy runs, and the
CatVTON and DreamFit commands give the losses, exported weights and pictures recorded in tests/golden/, within
tolerances that hold on any CPU (tests/golden_record.py says how they were chosen).

`DIFFBASE_RECORD=1 pytest tests/test_behaviour_kept.py` rewrites the record (only for a deliberate
change of behaviour, with the reason in the commit message)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.golden_record import Record, rgb
from tests.helpers import TINY_EXPERIMENTS, run_cli, train_tiny

ROOT = Path(__file__).resolve().parents[1]
RECORD = os.environ.get("DIFFBASE_RECORD") == "1"
ZOO = ROOT / "src" / "diffbase" / "zoo_weights"


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def run_record(name: str, out: Path) -> Record:
    """The losses of every step and every weight file the run exported, keyed by its path in the output folder."""
    config = yaml.safe_load((out / "config.yaml").read_text())
    losses = json.loads((out / "losses.json").read_text())
    record = Record(name, lr=float(config["training"]["learning_rate"]), steps=len(losses))
    record.losses = losses
    for entry in json.loads((out / "exports.json").read_text()).values():
        path = Path(entry)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.suffix in (".safetensors", ".bin"):
                record.weights[str(f.relative_to(out))] = file_tensors(f)
    return record


def check(record: Record) -> None:
    record.save() if RECORD else record.check()


@pytest.mark.parametrize("path", TINY_EXPERIMENTS, ids=[p.stem for p in TINY_EXPERIMENTS])
def test_tiny_experiment_unchanged(path: Path, tmp_path: Path) -> None:
    code, _, err = train_tiny(path, tmp_path, 3)
    assert code == 0, err
    record = run_record(f"tiny/{path.stem}", tmp_path)
    record.images["validation"] = rgb(tmp_path / "validation" / "step-000003.png")
    check(record)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffbase.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), 24, 6, seed=0, size=(32, 32))


@pytest.mark.parametrize(
    ("config", "model"), [("demo/tryon.yaml", "sd15-toy"), ("toy/flux1_dreamfit.yaml", "flux1-toy")]
)
def test_toy_runs_unchanged(config: str, model: str, synth: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "train",
        str(ROOT / "configs" / "experiments" / config),
        f"model.pretrained_path={ZOO / model}",
        f"data.train_path={synth}",
        f"experiment.output_dir={tmp_path}",
        "training.max_steps=3",
        "training.batch_size=2",
        "training.checkpoint_every=0",
        "training.validation.loss_split=0.25",
    )
    assert code == 0, err
    check(run_record(f"toy/{model}", tmp_path))


def test_catvton_and_dreamfit_commands_unchanged(tiny_model, synth: Path, tmp_path: Path) -> None:
    from tests.helpers import dreamfit_checkpoint

    test = synth / "test"
    person, mask = test / "image" / "00000.png", test / "agnostic-mask" / "00000_mask.png"
    garment = test / "cloth" / "00001.png"
    code, _, err = run_cli(
        "tryon", "--method", "catvton", "--model", str(ZOO / "sd15-toy"), "--person", str(person),
        "--mask", str(mask), "--garment", str(garment), "--size", "32x32", "--steps", "5",
        "--out", str(tmp_path / "tryon.png"),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "dreamfit", "--mode", "tryon", "--model", str(tiny_model("flux1")), "--checkpoint",
        str(dreamfit_checkpoint(tiny_model, tmp_path)), "--person", str(person), "--mask", str(mask),
        "--garment", str(garment), "--prompt", "a person", "--size", "32x32", "--steps", "3",
        "--out", str(tmp_path / "dreamfit.png"),
    )  # fmt: skip
    assert code == 0, err
    record = Record("commands")
    record.images = {name: rgb(tmp_path / f"{name}.png") for name in ("tryon", "dreamfit")}
    check(record)
