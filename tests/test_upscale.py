"""The tiled upscaler: plain img2img when it should be, exact sizes, tiles fused, DINO tokens injected, bad
input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.methods.upscale.mechanism.dino import DinoAdapter, context_with_dino, load_dino
from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, prepare, upscale
from diffbase.methods.upscale.mechanism.tiles import fuse, tile_grid, tile_weight
from diffbase.models.backbone import text_length
from diffbase.models.loading import load_pipeline
from tests.golden_record import assert_pixels_close
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
DINO = ROOT / "src" / "diffbase" / "zoo_weights" / "dinov2-tiny"
IMAGE = ROOT / "examples" / "dreamo" / "target" / "00000.png"  # 64x32


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_one_tile_is_flux_img2img_and_dino_strength_zero_is_plain(tiny_model) -> None:
    from diffusers import FluxImg2ImgPipeline

    pipe, _ = load_pipeline(tiny_model("flux1"))
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(IMAGE).convert("RGB")
    s = UpscaleSettings(scale=1.5, strength=0.6, steps=4, seed=2, prompt="a shirt")
    ours = upscale(pipe, image, s)
    padded, (w, h) = prepare(pipe, image, s)
    theirs = FluxImg2ImgPipeline(**pipe.components)(
        prompt="a shirt", image=padded, height=padded.height, width=padded.width, strength=0.6, num_inference_steps=4,
        guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(2), **text_length(pipe, "flux1"),
    ).images[0].crop((0, 0, w, h))  # fmt: skip
    assert ours.size == (96, 48)
    assert_pixels_close(ours, theirs)
    dino = load_dino(DINO)
    adapter = DinoAdapter(dino.config.hidden_size, pipe.transformer.config.joint_attention_dim)
    torch.nn.init.normal_(adapter.net[-1].weight, std=0.5)
    off = upscale(pipe, image, UpscaleSettings(**{**s.__dict__, "dino_strength": 0.0}), dino, adapter)
    on = upscale(pipe, image, s, dino, adapter)
    assert np.array_equal(pixels(off), pixels(ours))  # the same computation: bit for bit
    assert not np.array_equal(pixels(on), pixels(ours))


def test_strength_one_is_the_unmasked_joint_attention_with_the_dino_tokens(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    t, g = pipe.transformer, torch.Generator().manual_seed(0)
    embeds, text_ids = torch.randn(1, 8, 32, generator=g), torch.zeros(8, 3)
    tokens = torch.randn(1, 5, 32, generator=g)
    kw = {"hidden_states": torch.randn(1, 16, 64, generator=g), "pooled_projections": torch.randn(1, 32, generator=g),
          "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]), "img_ids": torch.rand(16, 3),
          "return_dict": False}  # fmt: skip
    with torch.no_grad():
        e, ids, masked = context_with_dino(embeds, text_ids, tokens, 1.0, 16)
        with_mask = t(encoder_hidden_states=e, txt_ids=ids, joint_attention_kwargs=masked, **kw)[0]
        without = t(encoder_hidden_states=e, txt_ids=ids, **kw)[0]
        e, ids, half = context_with_dino(embeds, text_ids, tokens, 0.5, 16)
        weaker = t(encoder_hidden_states=e, txt_ids=ids, joint_attention_kwargs=half, **kw)[0]
        plain = t(encoder_hidden_states=embeds, txt_ids=text_ids, **kw)[0]
    torch.testing.assert_close(with_mask, without, rtol=1e-5, atol=1e-5)
    # half strength lies between the full tokens and none
    assert 0 < float((weaker - plain).abs().mean()) < float((without - plain).abs().mean())


@pytest.mark.parametrize(("size", "scale", "expected"), [((37, 23), 2.0, (74, 46)), ((33, 17), 1.5, (50, 26))])
def test_output_size_is_exact_for_odd_sizes(tiny_model, size, scale, expected) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    image = Image.open(IMAGE).convert("RGB").resize(size)
    out = upscale(pipe, image, UpscaleSettings(scale=scale, steps=2, strength=0.5, tile=32, overlap=8))
    assert out.size == expected


def test_tiles_cover_the_grid_and_fusing_keeps_agreeing_tiles() -> None:
    tiles = tile_grid(20, 12, 8, 2)
    covered = torch.zeros(20, 12)
    for t in tiles:
        assert t.y % 2 == 0 and t.x % 2 == 0 and t.y + t.h <= 20 and t.x + t.w <= 12
        covered[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    assert covered.min() >= 1
    field = torch.randn(1, 4, 20, 12)
    torch.testing.assert_close(fuse([(t, t.cut(field)) for t in tiles], (1, 4, 20, 12), 2), field)
    w = tile_weight(tiles[0], 20, 12, 2)
    assert w[0, 0] == 1 and w[-1, -1] < 1  # no ramp on the image's own border, a ramp inside
    assert tile_grid(6, 6, 8, 2) == [tiles[0].__class__(0, 0, 6, 6)]  # smaller than a tile: one tile


def test_fused_and_pasted_tiles_are_different_computations_of_the_same_image(tiny_model) -> None:
    """(Which one shows seams is benchmarks/upscale.py's question, on the toy model: random weights draw noise.)"""
    pipe, _ = load_pipeline(tiny_model("flux1"))
    image = Image.open(IMAGE).convert("RGB")
    s = UpscaleSettings(scale=2.0, strength=0.7, steps=3, seed=1)
    whole = pixels(upscale(pipe, image, s))
    fused = pixels(upscale(pipe, image, UpscaleSettings(**{**s.__dict__, "tile": 64, "overlap": 16})))
    pasted = pixels(upscale(pipe, image, UpscaleSettings(**{**s.__dict__, "tile": 64, "overlap": 16}), paste=True))
    assert fused.shape == whole.shape == pasted.shape == (64, 128, 3)
    assert not np.array_equal(fused, pasted)


def test_bad_input_is_one_line_and_writes_nothing(tiny_model, tmp_path) -> None:
    model = tiny_model("flux1")
    out = tmp_path / "r.png"
    cases = {
        ("--scale", "0"): "--scale: expected a number above 0",
        ("--scale", "-2"): "--scale: expected a number above 0",
        ("--max-pixels", "1000"): "beyond the limit of 1000 pixels",
        ("--scale", "400", "--max-pixels", "1000000"): "is beyond the limit",
        (
            "--dino",
            str(model / "text_encoder"),
            "--adapter",
            str(tmp_path / "a.safetensors"),
        ): "expected a DINOv2 model",
        ("--dino", str(DINO)): "give both",
    }
    for args, message in cases.items():
        code, _, err = run_cli("upscale", str(IMAGE), str(out), "--model", str(model), "--steps", "2", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists(), (args, err)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    code, _, err = run_cli("upscale", str(tmp_path / "bomb.png"), str(out), "--model", str(model))
    assert code == 2 and "not a readable image" in err and not out.exists()


def test_trained_adapter_lowers_held_out_loss_and_loads_in_the_command(tmp_path) -> None:
    """The tiny experiment: 30 steps; the exported adapter then runs in `diffbase upscale`."""
    from diffbase.config import configs_dir, load_config
    from diffbase.methods import train

    config = load_config(configs_dir() / "experiments" / "tiny" / "flux1_upscale_dino.yaml", [
        f"data.train_path={ROOT / 'examples' / 'shapes'}", f"experiment.output_dir={tmp_path / 'run'}",
        "training.max_steps=30", "training.checkpoint_every=0", "training.validation.every=30"])  # fmt: skip
    train(config, show_progress=False)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    import json

    last = {k: v for line in rows for k, v in json.loads(line).items()}
    assert last["val_loss"] < last["val_loss_adapter_off"], last
    adapter = tmp_path / "run" / "upscale" / "dino_adapter.safetensors"
    code, _, err = run_cli("upscale", str(IMAGE), str(tmp_path / "u.png"), "--model", str(config_model(tmp_path)),
                           "--dino", str(DINO), "--adapter", str(adapter), "--steps", "2", "--tile", "32")  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "u.png").size == (128, 64)


def config_model(tmp_path: Path) -> Path:
    """The tiny FLUX.1 the tiny experiment trained on (built from the same config, seed 0), as a folder."""
    from diffbase.models.zoo import write_tiny

    out = tmp_path / "flux1"
    return out if out.exists() else write_tiny("flux1", out)
