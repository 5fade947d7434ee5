"""Regional compilation (`--compile`, `hardware.compile`): the denoiser's repeated blocks go through
torch.compile (inductor, as users run it; on a CPU it compiles C++), the results equal the eager ones, the
number of compiled graphs is reported, and combinations that cannot work are refused before loading.

Tolerances: generation compares 8-bit PNGs (equal within 1 level: inductor may fuse float ops in another
order); training compares losses within 1e-4 relative (the same)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_EXPERIMENTS, run_cli, train_tiny

TOY = "src/diffbase/zoo_weights/flux1-toy"


def test_block_classes_are_found_for_every_denoiser_kind(tiny_model) -> None:
    from diffbase.compile import block_classes
    from diffbase.models.loading import load_pipeline

    for family, expected in (("flux1", "FluxTransformerBlock"), ("sd3", "JointTransformerBlock"),
                             ("sd15", "BasicTransformerBlock")):  # fmt: skip
        pipe, spec = load_pipeline(tiny_model(family))
        denoiser = getattr(pipe, spec.denoiser)
        names = block_classes(denoiser)
        assert expected in names
        assert any(type(m).__name__ in names for m in denoiser.modules())


def test_generate_with_compile_gives_the_eager_picture_and_reports_graphs(tmp_path) -> None:
    common = ["generate", "--model", TOY, "--prompt", "a red square", "--steps", "2", "--size", "64x64", "--quiet"]
    code, out, err = run_cli(*common, "--compile", "--out", str(tmp_path / "compiled.png"))
    assert code == 0, err
    assert "graphs compiled" in out
    graphs = int(out.split("compile: ")[1].split()[0])
    assert 2 <= graphs <= 6  # FLUX.1's two block classes, and at most a recompile or two per class
    code, _, err = run_cli(*common, "--out", str(tmp_path / "eager.png"))
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "compiled.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "eager.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_training_with_compile_has_the_eager_losses(tmp_path) -> None:
    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    losses = {}
    for name, on in (("compiled", "true"), ("eager", "false")):
        code, out, err = train_tiny(path, tmp_path / name, 2, f"hardware.compile={on}", "training.validation.every=0")
        assert code == 0, err
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
        if on == "true":
            assert "blocks of FluxTransformer2DModel compiled" in out + err
    assert len(losses["compiled"]) == 2
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_compile_with_offload_that_moves_weights_inside_blocks_is_refused(tmp_path) -> None:
    code, _, err = run_cli("generate", "--model", TOY, "--prompt", "x", "--compile", "--offload", "sequential",
                           "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and "--compile" in err and "sequential" in err and len(err.strip().splitlines()) == 1
    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    code, _, err = train_tiny(path, tmp_path / "run", 1, "hardware.compile=true", "hardware.offload=blocks",
                              "hardware.gradient_checkpointing=true")  # fmt: skip
    assert code == 2 and "hardware.compile" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()
