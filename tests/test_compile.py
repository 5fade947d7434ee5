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


def recorded_compiles(monkeypatch) -> list[tuple[str, dict]]:
    """nn.Module.compile replaced by a recorder (nothing compiles): (class name, keyword arguments) per call."""
    import torch

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: calls.append((type(self).__name__, kw)))
    return calls


def test_the_compile_mode_reaches_each_blocks_torch_compile(monkeypatch, tmp_path) -> None:
    calls = recorded_compiles(monkeypatch)
    code, _, err = run_cli("generate", "--model", TOY, "--prompt", "x", "--steps", "1", "--size", "32x32",
                           "--compile", "max-autotune", "--quiet", "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 0, err
    assert {name for name, _ in calls} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert all(kw == {"mode": "max-autotune"} for _, kw in calls), calls
    calls.clear()
    code, _, err = run_cli("generate", "--model", TOY, "--prompt", "x", "--steps", "1", "--size", "32x32",
                           "--compile", "--quiet", "--out", str(tmp_path / "y.png"))  # fmt: skip
    assert code == 0 and calls and all(kw == {"mode": "default"} for _, kw in calls), (err, calls)
    calls.clear()
    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    code, _, err = train_tiny(path, tmp_path / "run", 1, "hardware.compile=max-autotune-no-cudagraphs",
                              "training.validation.every=0", "--quiet")  # fmt: skip
    assert code == 0, err
    assert calls and all(kw == {"mode": "max-autotune-no-cudagraphs"} for _, kw in calls), calls


def test_compile_settings_true_false_and_modes() -> None:
    from diffbase.compile import check, mode, options
    from diffbase.errors import UserError

    assert [mode(v) for v in (True, False, None, "default", "reduce-overhead")] == [
        "default", None, None, "default", "reduce-overhead"]  # fmt: skip
    assert options(False) == {} and options(True) == {"mode": "default"}
    with pytest.raises(UserError, match="hardware.compile: expected true, false or one of default"):
        mode("fast")
    # CUDA graphs: a CUDA device with nothing offloaded (the device named, so no GPU is needed to check it)
    assert check("reduce-overhead", "none", device="cuda") == "reduce-overhead"
    assert check("reduce-overhead", "none", device="cuda:1") == "reduce-overhead"
    for device, offload, words in (("cpu", "none", "torch skips them on cpu"), ("cuda", "model", "offload none")):
        with pytest.raises(UserError, match=words):
            check("reduce-overhead", offload, device=device)
    assert check("max-autotune", "model", device="cpu") == "max-autotune"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--compile", "fast"), "error: --compile: invalid choice: 'fast'"),
        (("--compile", "reduce-overhead"), "error: --compile: reduce-overhead captures CUDA graphs and torch skips "
                                           "them on cpu"),
    ],
)  # fmt: skip
def test_bad_or_cpu_graph_compile_modes_are_one_line(args, expected, tmp_path) -> None:
    code, _, err = run_cli("generate", "--model", TOY, "--prompt", "x", "--device", "cpu", *args,
                           "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    code, _, err = train_tiny(path, tmp_path / "run", 1, f"hardware.compile={args[1]}", "hardware.device=cpu")
    assert code == 2 and err.count("\n") == 1 and "hardware.compile" in err and args[1] in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()
