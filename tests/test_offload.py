"""Offload on every model-running command: `--offload model | blocks | sequential` is accepted everywhere, and
each method's sampling loop gives the picture it gives without offload. The hooks are diffusers' own; on this
CPU they are installed with the CPU as the compute device (the command itself refuses offload without a GPU),
so what is tested is that every loop computes through the hooks and puts its tensors on the device they
report, not where the weights wait. Sequential offload is left to the GPU stage: accelerate's layer hooks with
the CPU as the compute device fail inside CLIP's embeddings (`set_module_tensor_to_device`), a path no user
takes. The GPU stage (benchmarks/gpu.py lowmem) measures the memory."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.errors import UserError
from diffbase.runtime import OFFLOAD
from tests.helpers import dreamfit_checkpoint, run_cli, write_dreamo_folder

MODEL_COMMANDS = ("generate", "edit", "inpaint", "customize", "dreamfit", "tryon", "upscale", "serve")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from diffbase.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_that_runs_a_model_takes_every_offload() -> None:
    found = subcommands()
    for name in MODEL_COMMANDS:
        flags = {a.dest: a for a in found[name]._actions}
        assert "offload" in flags and tuple(flags["offload"].choices) == OFFLOAD, name
        assert "offload_blocks" in flags, name


def test_offload_refused_on_a_cpu_and_a_bad_group_size(tiny_model, tmp_path) -> None:
    common = ["generate", "--model", str(tiny_model("flux1")), "--prompt", "a cat", "--size", "32x32"]
    code, _, err = run_cli(*common, "--offload", "blocks", "--out", str(tmp_path / "a.png"))
    assert code == 2 and "--offload blocks: offloading moves weights to an accelerator" in err
    code, _, err = run_cli(*common, "--offload", "blocks", "--offload-blocks", "0", "--out", str(tmp_path / "b.png"))
    assert code == 2 and "--offload-blocks: expected a whole number of blocks >= 1, got 0" in err
    assert not list(tmp_path.iterdir())


@pytest.fixture
def hooks_on_the_cpu(monkeypatch):
    """place_pipeline as the commands call it, with the CPU accepted as the compute device."""
    from diffbase.models import folders, loading
    from diffbase.models.placement import offload_hooks

    def place(pipe, device, offload="none", blocks=1):
        if offload not in OFFLOAD:
            raise UserError(f"--offload: {offload}")
        return offload_hooks(pipe, torch.device(device), offload, blocks)

    monkeypatch.setattr(folders, "place_pipeline", place)
    monkeypatch.setattr(loading, "place_pipeline", place)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload-inputs")
    person = Image.new("RGB", (32, 32), (200, 120, 90))
    person.paste((30, 60, 190), (8, 8, 24, 28))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = {"person": root / "person.png", "garment": root / "garment.png", "mask": root / "mask.png"}
    person.save(out["person"])
    Image.new("RGB", (32, 32), (20, 60, 200)).save(out["garment"])
    mask.save(out["mask"])
    return out


def argv(name: str, tiny_model, inputs: dict[str, Path], tmp: Path) -> list[str]:
    """A small run of each command (2 steps, 32 px)."""
    flux = str(tiny_model("flux1"))
    if name == "generate":
        return ["generate", "--model", flux, "--prompt", "a cat", "--size", "32x32", "--steps", "2"]
    if name == "edit":
        return ["edit", "--model", str(tiny_model("flux1-kontext")), "--image", str(inputs["person"]), "--prompt", "red",
                "--steps", "2"]  # fmt: skip
    if name == "inpaint":
        return ["inpaint", "--model", str(tiny_model("flux1-fill")), "--image", str(inputs["person"]), "--mask",
                str(inputs["mask"]), "--prompt", "red", "--steps", "2"]  # fmt: skip
    if name == "upscale":
        return ["upscale", str(inputs["person"]), "--model", flux, "--steps", "2", "--scale", "2"]
    if name == "tryon":
        return ["tryon", "--method", "catvton", "--model", str(tiny_model("sd15")), "--person", str(inputs["person"]),
                "--garment", str(inputs["garment"]), "--mask", str(inputs["mask"]), "--size", "32x32",
                "--steps", "2"]  # fmt: skip
    if name == "dreamfit":
        return ["dreamfit", "--model", flux, "--checkpoint", str(dreamfit_checkpoint(tiny_model, tmp)),
                "--garment", str(inputs["garment"]), "--prompt", "a shirt", "--size", "32x32", "--steps", "2"]  # fmt: skip
    if name == "customize":
        from diffbase.models.loading import load_pipeline

        folder = tmp / "dreamo"
        folder.mkdir()
        write_dreamo_folder(load_pipeline(flux)[0], folder)
        return ["customize", "--model", flux, "--dreamo", str(folder), "--version", "none", "--ref",
                f"{inputs['garment']}:ip", "--prompt", "[ref#1] on a table", "--size", "32x32", "--steps", "2",
                "--ref-res", "32"]  # fmt: skip
    raise AssertionError(name)


@pytest.mark.parametrize("name", [c for c in MODEL_COMMANDS if c != "serve"])
def test_each_command_gives_the_same_picture_through_the_offload_hooks(
    name, tiny_model, inputs, tmp_path, hooks_on_the_cpu
) -> None:
    args = argv(name, tiny_model, inputs, tmp_path)
    pictures = {}
    for offload in ("none", "model", "blocks"):
        out = tmp_path / f"{offload}.png"
        code, _, err = run_cli(*args, "--offload", offload, "--out", str(out))
        assert code == 0, f"{offload}: {err}"
        pictures[offload] = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    for offload in ("model", "blocks"):  # same weights, same order of operations: the same bytes
        assert np.abs(pictures[offload] - pictures["none"]).max() <= 1, offload


def test_a_backbone_under_hooks_reports_the_device_they_bring_it_to(tiny_model) -> None:
    from diffbase.models.families.types import Backbone
    from diffbase.models.loading import load_pipeline
    from diffbase.models.placement import compute_device, offload_hooks

    pipe, spec = load_pipeline(tiny_model("flux1"))
    offload_hooks(pipe, torch.device("cpu"), "sequential")
    assert next(pipe.transformer.parameters()).device.type == "meta"  # the weights wait elsewhere
    assert Backbone(spec, pipe).device.type == "cpu" and compute_device(pipe, pipe.vae).type == "cpu"


def test_no_sampling_loop_takes_its_device_from_a_components_weights() -> None:
    """With offload a component's weights wait on the CPU (or meta) until it runs: loops ask
    placement.execution_device / compute_device, or bb.device, which does."""
    import re

    root = Path(__file__).resolve().parents[1] / "src" / "diffbase"
    pattern = re.compile(r"\b(?:pipe|bb\.pipe)\.(?:transformer|unet|vae|text_encoder\w*)\.device\b")
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "bench" not in p.name
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not found, found
