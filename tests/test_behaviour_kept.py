"""Behaviour pinned across redesigns: every tiny experiment, the try-on and DreamFit toy runs, and the
CatVTON and DreamFit commands give, bit for bit on a CPU, the losses, exported weights and pictures
recorded in tests/golden/behaviour.json before the method seam was built.

`DIFFBASE_RECORD=1 pytest tests/test_behaviour_kept.py` rewrites the record (only for a deliberate
change of behaviour, with the reason in the commit message)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.test_experiments import TINY, train_tiny

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "behaviour.json"
RECORD = os.environ.get("DIFFBASE_RECORD") == "1"
ZOO = ROOT / "src" / "diffbase" / "zoo_weights"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def exported(out: Path) -> dict[str, str]:
    """A digest of every weight file the run exported, keyed by its path inside the output folder."""
    digests = {}
    for entry in json.loads((out / "exports.json").read_text()).values():
        path = Path(entry)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.suffix in (".safetensors", ".bin"):
                digests[str(f.relative_to(out))] = tensor_digest(file_tensors(f))
    return digests


def image_digest(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()[:20]


def run_record(out: Path) -> dict:
    losses = json.loads((out / "losses.json").read_text())
    return {"losses": [float.hex(float(v)) for v in losses], "exports": exported(out)}


def check(name: str, got: dict) -> None:
    record = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORD:
        record[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    assert name in record, f"{name}: not recorded in {GOLDEN}"
    assert got == record[name]


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_tiny_experiment_unchanged(path: Path, tmp_path: Path) -> None:
    code, _, err = train_tiny(path, tmp_path, 3)
    assert code == 0, err
    check(
        f"tiny/{path.stem}",
        run_record(tmp_path) | {"validation": image_digest(tmp_path / "validation" / "step-000003.png")},
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffbase.toy.synthetic import write_dataset

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
    check(f"toy/{model}", run_record(tmp_path))


def test_catvton_and_dreamfit_commands_unchanged(tiny_model, synth: Path, tmp_path: Path) -> None:
    from tests.test_dreamfit_mechanism import tiny_checkpoint

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
        str(tiny_checkpoint(tiny_model, tmp_path)), "--person", str(person), "--mask", str(mask),
        "--garment", str(garment), "--prompt", "a person", "--size", "32x32", "--steps", "3",
        "--out", str(tmp_path / "dreamfit.png"),
    )  # fmt: skip
    assert code == 0, err
    check("commands", {name: image_digest(tmp_path / f"{name}.png") for name in ("tryon", "dreamfit")})
