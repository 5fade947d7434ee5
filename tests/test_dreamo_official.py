"""DreamO inference against the official code's behaviour (bytedance/DreamO at 461e35b): the reference resize,
the references' latent sample, Turbo's default and fusion order, `--version v1`, the style prompt and the
default dtype."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.errors import UserError
from diffbase.methods.dreamo.mechanism.files import TURBO_FILE, fuse_dreamo, fusion_list, recipe, turbo_file
from diffbase.methods.dreamo.mechanism.generate import Reference, encode_references
from diffbase.methods.dreamo.mechanism.preprocess import resize_by_area
from diffbase.models.loading import load_pipeline
from tests.helpers import peft_lora, write_dreamo_folder


def official_area_resize(pixels: np.ndarray, area: int) -> np.ndarray:
    """The official `resize_numpy_image_area`: sides scaled to about `area`, floored to multiples of 16."""
    h, w = pixels.shape[:2]
    k = math.sqrt(area / (h * w))
    h, w = int(h * k) - int(h * k) % 16, int(w * k) - int(w * k) % 16
    return cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("size", [(203, 311), (640, 480), (23, 17), (20, 30)])  # 2 shrink, 2 enlarge (both res.)
@pytest.mark.parametrize("resolution", [32, 64])
def test_reference_resize_is_opencv_inter_area_exactly(size: tuple[int, int], resolution: int) -> None:
    rng = np.random.default_rng(size[0] * 1000 + size[1] + resolution)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = np.asarray(resize_by_area(Image.fromarray(pixels), resolution * resolution))
    theirs = official_area_resize(pixels, resolution * resolution)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_official_reference_latents_are_the_global_rng_sample_after_seeding(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(2)]
    refs = [Reference(images[1], "ip", 2), Reference(images[0], "ip", 1)]  # encoded in the order given
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ours = encode_references(pipe, refs, seed=7, ref_noise="official")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global generator is left as it was
    torch.manual_seed(7)  # what the official code draws from, here seeded with --seed
    theirs = []
    for ref in refs:
        x = torch.from_numpy(np.asarray(ref.image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        z = pipe.vae.encode(x).latent_dist.sample()
        theirs.append((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    seeded = encode_references(pipe, refs, seed=7, ref_noise="seeded")  # the earlier recipe, still there
    assert not torch.allclose(seeded[0], ours[0])
    again = encode_references(pipe, refs, seed=7, ref_noise="seeded")
    assert all(torch.equal(a, b) for a, b in zip(seeded, again, strict=True))


def test_turbo_is_found_in_the_folder_and_fused_third(tmp_path: Path) -> None:
    folder = tmp_path
    assert turbo_file(folder) is None
    (folder / TURBO_FILE).write_bytes(b"")
    assert turbo_file(folder) == folder / TURBO_FILE
    assert turbo_file(folder, use=False) is None  # --no-turbo
    with pytest.raises(UserError, match="--turbo: .*no such file"):
        turbo_file(folder, str(tmp_path / "missing.safetensors"))
    order = [name for name, *_ in fusion_list(folder, "v1.1", folder / TURBO_FILE)]
    assert order == ["dreamo_0", "dreamo_1", "turbo", "dreamo_2", "dreamo_3"]  # dreamo, cfg, turbo, sft, dpo
    assert [name for name, *_ in fusion_list(folder, "none", folder / TURBO_FILE)] == ["dreamo_0", "turbo"]


def test_turbo_file_fuses_at_one(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    pipe, _ = load_pipeline(tiny_model("flux1"))
    write_dreamo_folder(pipe, tmp_path)
    state, scales = peft_lora(pipe, seed=5)  # Turbo-Alpha ships in diffusers' layout, no alpha
    baked = {k: v * (scales[k.rsplit(".lora_", 1)[0]] if ".lora_B." in k else 1) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in baked.items()}, str(tmp_path / TURBO_FILE))
    path = "transformer_blocks.0.attn.to_q"
    base = pipe.transformer.get_submodule(path).weight.detach().clone()
    without, _ = load_pipeline(tiny_model("flux1"))
    fuse_dreamo(without, tmp_path, "none")
    fuse_dreamo(pipe, tmp_path, "none", turbo_file(tmp_path))
    turbo_delta = baked[f"transformer.{path}.lora_B.weight"] @ baked[f"transformer.{path}.lora_A.weight"]
    fused, plain = pipe.transformer.get_submodule(path).weight, without.transformer.get_submodule(path).weight
    torch.testing.assert_close(fused - plain, turbo_delta, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain, base)


def parse(*argv: str) -> argparse.Namespace:
    from diffbase.methods.dreamo.command import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    return parser.parse_args(["dreamo", "--model", "m", "--ref", "r.png:ip", "--prompt", "p", "--out", "o.png",
                              *argv])  # fmt: skip


def test_step_guidance_and_dtype_defaults_follow_turbo_version_and_device(tmp_path: Path) -> None:
    from diffbase.methods.dreamo import command

    (tmp_path / TURBO_FILE).write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {  # argv -> (steps, guidance, turbo)
        ("--dreamo", str(tmp_path)): (12, 4.5, tmp_path / TURBO_FILE),
        ("--dreamo", str(tmp_path), "--no-turbo"): (25, 4.5, None),
        ("--dreamo", str(empty)): (25, 4.5, None),
        ("--dreamo", str(empty), "--turbo", str(tmp_path / TURBO_FILE)): (12, 4.5, tmp_path / TURBO_FILE),
        ("--dreamo", str(tmp_path), "--version", "v1"): (12, 3.5, tmp_path / TURBO_FILE),
        ("--dreamo", str(tmp_path), "--steps", "7", "--guidance", "2"): (7, 2.0, tmp_path / TURBO_FILE),
    }
    for argv, (steps, guidance, turbo) in cases.items():
        args = parse(*argv, "--device", "cpu")
        command.fill_defaults(args)
        assert (args.steps, args.guidance, args.turbo_file) == (steps, guidance, turbo), argv
        assert args.dtype == "float32" and args.ref_noise == "official"
    with pytest.raises(SystemExit):  # --turbo and --no-turbo together
        parse("--dreamo", str(tmp_path), "--turbo", "x", "--no-turbo")


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "float32"), ("cuda", "bfloat16"), ("cuda:1", "bfloat16"),
                                               (torch.device("cuda", 0), "bfloat16"), ("mps", "float32")])  # fmt: skip
def test_default_dtype_is_bfloat16_on_cuda_only(device, dtype: str, monkeypatch) -> None:
    from diffbase.methods.dreamo import command

    assert command.default_dtype(device) == dtype
    args = parse("--dreamo", "d")
    monkeypatch.setattr("diffbase.runtime.resolve_device", lambda *_a, **_k: torch.device(device))
    command.fill_defaults(args)
    assert args.dtype == dtype
    explicit = parse("--dreamo", "d", "--dtype", "float16")
    command.fill_defaults(explicit)
    assert explicit.dtype == "float16"


def test_v1_fuses_the_v1_1_loras_as_the_official_app() -> None:
    assert recipe("v1").loras == recipe("v1.1").loras and recipe("v1").guidance == 3.5
    assert recipe("v1.1").guidance == 4.5
    with pytest.raises(UserError, match="--version"):
        recipe("v2")


def test_style_prompt_is_used_as_written(monkeypatch) -> None:
    from diffbase.methods.dreamo.mechanism import generate
    from diffbase.methods.dreamo.mechanism.generate import DreamOSettings
    from diffbase.methods.dreamo.method import DREAMO

    seen = []
    monkeypatch.setattr(generate, "dreamo_generate", lambda pipe, emb, refs, s: seen.append((refs, s.prompt)))
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    DREAMO.run((None, None), {"references": [(image, "style", None, None)], "resolution": 32},
               DreamOSettings(prompt="a cat"))  # fmt: skip
    refs, prompt = seen[0]
    assert prompt == "a cat" and refs[0].task == "style" and refs[0].image.size == (32, 32)
