"""`diffbase generate` gives the same pixels as the bare diffusers pipeline with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.golden_record import assert_pixels_close
from tests.helpers import FAMILIES, run_cli

# Guidance that exercises each family's own path: CFG for SD, the guidance embedding for FLUX dev.
GUIDANCE = {"sd15": 5.0, "sdxl": 5.0, "sd3": 4.0, "flux1": 3.5, "flux2": 4.0, "flux2-klein": 4.0}


def diffusers_image(folder: Path, prompt: str, seed: int, steps: int, guidance: float, size: int) -> np.ndarray:
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_the_diffusers_pipeline(family: str, tiny_model, tmp_path: Path) -> None:
    folder = tiny_model(family)
    out = tmp_path / "x.png"
    code, _, err = run_cli(
        "generate", "--model", str(folder), "--prompt", "a photo of a cat", "--seed", "7", "--steps", "3",
        "--guidance", str(GUIDANCE[family]), "--size", "64x64", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    ours = np.asarray(Image.open(out).convert("RGB"))
    theirs = diffusers_image(folder, "a photo of a cat", 7, 3, GUIDANCE[family], 64)
    assert ours.shape == (64, 64, 3)
    assert_pixels_close(ours, theirs)
    assert ours.std() > 0  # an image, not a blank


def test_png_carries_prompt_seed_model_and_settings(tiny_model, tmp_path: Path) -> None:
    folder = tiny_model("sd15")
    out = tmp_path / "x.png"
    code, _, err = run_cli(
        "generate", "--model", str(folder), "--prompt", "a red shirt", "--negative", "blurry", "--seed", "11",
        "--steps", "2", "--guidance", "6", "--size", "64x64", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads(Image.open(out).text["diffbase"])
    assert meta["prompt"] == "a red shirt" and meta["negative"] == "blurry"
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["height"], meta["width"]) == (11, 2, 6.0, 64, 64)
    assert meta["model"] == str(folder) and meta["pipeline"] == "StableDiffusionPipeline"
    assert "a red shirt" in Image.open(out).text["parameters"]


def test_seed_changes_the_image_and_repeats_it(tiny_model, tmp_path: Path) -> None:
    folder = tiny_model("flux1")
    images = []
    for i, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"{i}.png"
        args = ["generate", "--model", str(folder), "--prompt", "cat", "--seed", str(seed), "--steps", "2"]
        assert run_cli(*args, "--size", "64x64", "--out", str(out))[0] == 0
        images.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_prompts_file_writes_a_batch(tiny_model, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na shirt\n")
    out = tmp_path / "batch"
    code, stdout, err = run_cli(
        "generate", "--model", str(tiny_model("sd15")), "--prompts", str(prompts), "--steps", "1",
        "--size", "64x64", "--seed", "5", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png"]
    metas = [json.loads(Image.open(f).text["diffbase"]) for f in files]
    assert [m["prompt"] for m in metas] == ["a cat", "a dog", "a shirt"]
    assert [m["seed"] for m in metas] == [5, 6, 7]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "/nonexistent/flux"], "--model: /nonexistent/flux not found"),
        (["--size", "64by64"], "--size: expected HxW such as 512x512, got '64by64'"),
        (["--negative", "ugly"], "--negative: the Flux2KleinPipeline takes no negative prompt"),
        (["--true-cfg", "2"], "--true-cfg: only FLUX.1 has true CFG"),
    ],
)
def test_bad_generate_input_is_one_line_exit_2(args: list[str], expected: str, tiny_model, tmp_path: Path) -> None:
    base = {"--model": str(tiny_model("flux2-klein")), "--prompt": "a cat", "--steps": "1", "--size": "64x64"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    out = tmp_path / "x.png"
    code, _, err = run_cli("generate", *argv, "--out", str(out))
    assert code == 2
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".x.png*"))


def test_folder_without_model_index_or_with_missing_component(tiny_model, tmp_path: Path) -> None:
    import shutil

    code, _, err = run_cli("generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "expected a diffusers model folder with model_index.json" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("sd15"), broken)
    shutil.rmtree(broken / "vae")
    code, _, err = run_cli("generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "lists 'vae' but the folder" in err
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    code, _, err = run_cli("generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert code == 2 and "pipeline 'KandinskyPipeline' is not a supported family" in err
