"""The tiled upscaler: plain img2img when it should be, exact sizes, tiles fused, DINO features injected (as
tokens, or aligned to the latent grid), bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.errors import UserError
from diffbase.methods.upscale.mechanism.dino import (
    DinoAdapter,
    adapter_widths,
    align_to_latent,
    context_with_dino,
    load_dino,
)
from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, prepare, upscale, velocity
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


@pytest.mark.parametrize("injection", ["tokens", "aligned"])
def test_trained_adapter_lowers_held_out_loss_and_loads_in_the_command(tmp_path, injection) -> None:
    """The tiny experiment: 30 steps in either injection; the exported adapter records it, loads with it and
    runs in `diffbase upscale`, changing the result."""
    from diffbase.config import configs_dir, load_config
    from diffbase.methods import train
    from diffbase.methods.upscale.method import UPSCALE

    config = load_config(configs_dir() / "experiments" / "tiny" / "flux1_upscale_dino.yaml", [
        f"data.train_path={ROOT / 'examples' / 'shapes'}", f"experiment.output_dir={tmp_path / 'run'}",
        "training.max_steps=30", "training.checkpoint_every=0", "training.validation.every=30",
        f"training.upscale.dino_injection={injection}"])  # fmt: skip
    result = train(config, show_progress=False)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    import json

    last = {k: v for line in rows for k, v in json.loads(line).items()}
    assert last["val_loss"] < last["val_loss_adapter_off"], last
    adapter = tmp_path / "run" / "upscale" / "dino_adapter.safetensors"
    model = config_model(tmp_path)
    pipe, _, loaded = UPSCALE.load(str(model), str(DINO), str(adapter))
    assert loaded.injection == injection  # the tiny model's two widths are equal: the mode comes from the file
    trained = result.trained.modules["adapter"].state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key].cpu())
    code, _, err = run_cli("upscale", str(IMAGE), str(tmp_path / "u.png"), "--model", str(model),
                           "--dino", str(DINO), "--adapter", str(adapter), "--steps", "2", "--tile", "32")  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "u.png").size == (128, 64)
    code, _, err = run_cli("upscale", str(IMAGE), str(tmp_path / "plain.png"), "--model", str(model), "--steps", "2",
                           "--tile", "32")  # fmt: skip
    assert code == 0, err
    assert not np.array_equal(pixels(Image.open(tmp_path / "u.png")), pixels(Image.open(tmp_path / "plain.png")))


def test_injection_is_checked_before_loading_and_round_trips_through_the_file(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    exp = ROOT / "configs" / "experiments" / "tiny" / "flux1_upscale_dino.yaml"
    code, _, err = run_cli("train", str(exp), f"experiment.output_dir={tmp_path / 'run'}",
                           "training.upscale.dino_injection=aligend")  # fmt: skip
    assert code == 2 and "training.upscale.dino_injection: expected one of" in err, err
    assert "'aligned'" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    widths = {"tokens": 64, "aligned": 48}
    for injection in ("tokens", "aligned"):
        made = DinoAdapter(32, widths[injection], 40, injection)
        torch.nn.init.normal_(made.net[-1].weight)
        back = DinoAdapter.load(made.save(tmp_path / f"{injection}.safetensors"), widths, 32)
        assert back.injection == injection and back.dims == made.dims
        torch.testing.assert_close(back.state_dict(), made.state_dict())
    # a file from before the option (no injection recorded) is `tokens`
    save_file(load_file(tmp_path / "tokens.safetensors"), tmp_path / "old.safetensors",
              metadata={"dino_width": "32", "context_width": "64", "hidden": "40"})  # fmt: skip
    assert DinoAdapter.load(tmp_path / "old.safetensors", widths, 32).injection == "tokens"
    with pytest.raises(UserError, match=r"maps 32 -> 48 features \(aligned\); .* need 32 -> 64"):
        DinoAdapter.load(tmp_path / "aligned.safetensors", {"tokens": 64, "aligned": 64}, 32)
    save_file(load_file(tmp_path / "tokens.safetensors"), tmp_path / "lora.safetensors")  # no adapter metadata
    with pytest.raises(UserError, match=r"lora\.safetensors is not a DINO adapter"):  # was "maps None -> None"
        DinoAdapter.load(tmp_path / "lora.safetensors", widths, 32)
    assert adapter_widths(load_pipeline(ROOT / "src" / "diffbase" / "zoo_weights" / "flux1-toy")[0].transformer.config) \
        == {"tokens": 64, "aligned": 128}  # fmt: skip


def test_alignment_puts_each_latent_token_at_the_features_of_the_pixels_it_covers() -> None:
    """align_to_latent's geometry: the patch grid and the latent grid cover the same tile (cell centres
    matched), the leading CLS token is ignored, and the result is in FLUX's packed (row by row) order."""
    g, c = 4, 3
    patches = torch.randn(1, g * g, c)
    cls = torch.randn(1, 1, c)
    same = align_to_latent(torch.cat([cls, patches], 1), (g, g))
    torch.testing.assert_close(same, patches)  # the same grid: the patches themselves, in order
    torch.testing.assert_close(align_to_latent(torch.cat([cls * 9, patches], 1), (g, g)), same)
    # left half 1, right half 0, on an 8-wide, 6-high latent grid: the step stays in the middle
    left = (torch.arange(g * g) % g < g // 2).float().view(1, g * g, 1)
    out = align_to_latent(torch.cat([torch.zeros(1, 1, 1), left], 1), (6, 8)).view(6, 8)
    torch.testing.assert_close(out[:, :3], torch.ones(6, 3))
    torch.testing.assert_close(out[:, 5:], torch.zeros(6, 3))
    torch.testing.assert_close(out[:, 3:5], torch.tensor([0.75, 0.25]).expand(6, 2))
    # a packed latent laid out as _pack_latents does: token k is row k // w, column k % w
    top = (torch.arange(g * g) // g < 1).float().view(1, g * g, 1)
    rows = align_to_latent(torch.cat([torch.zeros(1, 1, 1), top], 1), (2, 6)).view(2, 6)
    assert bool((rows[0] > rows[1]).all())


def test_aligned_features_of_one_region_change_the_prediction_mostly_there(tiny_model) -> None:
    """Changing the DINO features of the tile's top-left quarter changes the transformer's velocity mostly in
    the top-left quarter of the latent, with aligned injection (20x on this seed; the attention spreads a little of it)."""
    pipe, _ = load_pipeline(tiny_model("flux1"))
    t_model, g = pipe.transformer, torch.Generator().manual_seed(0)
    adapter = DinoAdapter(8, adapter_widths(t_model.config)["aligned"], injection="aligned")
    torch.nn.init.normal_(adapter.net[-1].weight, std=0.5, generator=g)
    features = torch.randn(1, 1 + 4 * 4, 8, generator=g)  # CLS + a 4 x 4 patch grid
    changed = features.clone()
    changed[:, 1:].view(1, 4, 4, 8)[:, :2, :2] += 3 * torch.randn(1, 2, 2, 8, generator=g)
    x = torch.randn(1, t_model.config.in_channels // 4, 16, 16, generator=g)  # 16 x 16 latents: 8 x 8 tokens
    embeds, pooled = (
        torch.randn(1, 8, t_model.config.joint_attention_dim, generator=g),
        torch.randn(1, t_model.config.pooled_projection_dim, generator=g),
    )
    text_ids = torch.zeros(8, 3)

    def predict(f: torch.Tensor) -> torch.Tensor:
        added = align_to_latent(adapter(f), (8, 8))
        return velocity(pipe, x, torch.tensor([500.0]), pooled, (embeds, text_ids, None, added), torch.tensor([3.5]))

    with torch.no_grad():
        diff = (predict(changed) - predict(features)).abs().mean(1)[0]  # (16, 16)
    inside = float(diff[:8, :8].mean())
    outside = float((diff.sum() - diff[:8, :8].sum()) / (diff.numel() - 64))
    assert inside > 5 * outside, (inside, outside)


def config_model(tmp_path: Path) -> Path:
    """The tiny FLUX.1 the tiny experiment trained on (built from the same config, seed 0), as a folder."""
    from diffbase.models.zoo import write_tiny

    out = tmp_path / "flux1"
    return out if out.exists() else write_tiny("flux1", out)
