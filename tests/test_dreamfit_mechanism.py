"""DreamFit's write and read passes on a tiny FLUX.1 transformer."""

from __future__ import annotations

import copy

import torch

from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, LoraPair, diffusers_name, random_official
from diffbase.methods.dreamfit.mechanism.passes import install, write_banks
from diffbase.models.loading import load_pipeline
from tests.helpers import dreamfit_checkpoint, transformer_inputs


def pairs_for(transformer, zero: bool = False) -> dict[str, LoraPair]:
    out = {}
    for key, (down, up) in random_official(Dims.of(transformer), rank=4, seed=1).items():
        kind, index, name = key.split("_blocks.")[0], int(key.split(".")[1]), key.split(".", 2)[2]
        out[diffusers_name(kind, index, name)] = LoraPair(down, up * (0 if zero else 20), 4.0)
    return out


def test_plain_mode_is_diffusers_and_zero_loras_write_the_plain_qkv(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    stock = copy.deepcopy(pipe.transformer)
    x = transformer_inputs(stock, 0)
    with torch.no_grad():
        expected = stock(**x)[0]
    plain, zero = copy.deepcopy(stock), copy.deepcopy(stock)
    state_plain, state_zero = install(plain), install(zero, pairs_for(zero, zero=True))
    with torch.no_grad():
        assert torch.equal(plain(**x)[0], expected)  # mode "off" is the stock processor's computation
    garment = transformer_inputs(stock, 1)
    state_plain.keep_bank_queries = state_zero.keep_bank_queries = True  # store q too, to compare it
    write_banks(plain, state_plain, **garment)
    write_banks(zero, state_zero, **garment)
    assert set(state_plain.banks) == set(state_zero.banks) and len(state_plain.banks) == len(plain.attn_processors)
    for name, (q, k, v) in state_plain.banks.items():
        zq, zk, zv = state_zero.banks[name]
        assert torch.equal(q, zq) and torch.equal(k, zk) and torch.equal(v, zv)
    lora = copy.deepcopy(stock)
    state_lora = install(lora, pairs_for(lora))
    write_banks(lora, state_lora, **garment)
    assert all(not torch.equal(state_lora.banks[n][2], state_plain.banks[n][2]) for n in state_plain.banks)


def test_banks_are_written_once_and_read_every_step_dropping_bank_queries_exactly(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    t = pipe.transformer
    state = install(t, pairs_for(t))
    write_banks(t, state, **transformer_inputs(t, 1))
    blocks = len(t.attn_processors)
    assert state.writes == blocks
    double = next(iter(k for k in state.banks if k.startswith("transformer_blocks")))
    single = next(iter(k for k in state.banks if k.startswith("single_transformer_blocks")))
    assert state.banks[double][1].shape[1] == 16 and state.banks[single][1].shape[1] == 8 + 16  # image / text+image
    x = transformer_inputs(t, 0)
    with torch.no_grad():
        fast = [t(**x)[0] for _ in range(3)]
    assert state.writes == blocks  # reading never writes
    state.keep_bank_queries = True  # the official way: the bank's queries too, their outputs sliced off
    write_banks(t, state, **transformer_inputs(t, 1))
    with torch.no_grad():
        slow = t(**x)[0]
        state.mode = "off"
        plain = t(**x)[0]
    assert torch.equal(fast[0], fast[2])
    assert (fast[0] - slow).abs().max() <= 1e-5
    assert (fast[0] - plain).abs().max() > 1e-3  # the garment's banks change the result


def test_a_generation_writes_the_banks_once_and_frees_them(tiny_model, tmp_path) -> None:
    from PIL import Image

    from diffbase.methods.dreamfit.mechanism.checkpoint import load_dreamfit
    from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings, dreamfit_generate, reference_image

    pipe, _ = load_pipeline(tiny_model("flux1"))
    pipe.set_progress_bar_config(disable=True)
    state = install(pipe.transformer, load_dreamfit(dreamfit_checkpoint(tiny_model, tmp_path), pipe.transformer))
    garment = Image.new("RGB", (32, 32), (200, 30, 30))
    settings = DreamFitSettings(prompt="a person wearing a red shirt", steps=4, height=32, width=32)
    image = dreamfit_generate(pipe, state, settings, reference_image("garment", garment, (32, 32)))
    assert image.size == (32, 32)
    blocks = len(pipe.transformer.attn_processors)
    assert state.write_passes == 1 and state.writes == blocks  # once, for 4 steps
    assert not state.banks and state.mode == "off"  # freed after the generation
    # true CFG: a second (negative) write pass on a black image, read by every negative call
    reads = []
    hook = pipe.transformer.register_forward_hook(lambda *_: reads.append(state.reading_negative))
    settings.true_cfg = 3.0
    guided = dreamfit_generate(pipe, state, settings, reference_image("garment", garment, (32, 32)))
    hook.remove()
    assert state.write_passes == 3 and state.writes == 3 * blocks and not state.negative
    assert reads == [False, True] + [False, True] * 4  # positive write, negative write, then cond/uncond a step
    assert guided.tobytes() != image.tobytes()


def test_all_three_modes_run_from_the_cli(tiny_model, tmp_path) -> None:
    import json

    from PIL import Image

    from tests.helpers import run_cli

    ckpt = dreamfit_checkpoint(tiny_model, tmp_path)
    Image.new("RGB", (48, 64), (30, 30, 200)).save(tmp_path / "g.png")
    Image.new("RGB", (48, 64), (220, 200, 180)).save(tmp_path / "p.png")
    Image.new("L", (48, 64), 255).save(tmp_path / "m.png")
    keypoints = [v for i in range(18) for v in (10 + i, 5 + 3 * i, 1.0)]
    (tmp_path / "pose.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": keypoints}]}))
    common = [
        "--model",
        str(tiny_model("flux1")),
        "--checkpoint",
        str(ckpt),
        "--garment",
        str(tmp_path / "g.png"),
        "--prompt",
        "a person in a blue shirt",
        "--size",
        "32x32",
        "--steps",
        "2",
    ]
    for mode, extra in (
        ("garment", []),
        ("pose", ["--pose", str(tmp_path / "pose.json")]),
        ("tryon", ["--person", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png")]),
    ):
        out = tmp_path / f"{mode}.png"
        code, _, err = run_cli("dreamfit", "--mode", mode, *common, *extra, "--out", str(out))
        assert code == 0, err
        assert Image.open(out).size == (32, 32) and json.loads(Image.open(out).text["diffbase"])["mode"] == mode
    code, _, err = run_cli("dreamfit", "--mode", "pose", *common, "--out", str(tmp_path / "x.png"))
    assert code == 2 and "needs --pose" in err
    # --true-cfg reaches the settings (a negative write pass changes the picture), also in bf16
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"cfg-{dtype}.png"
        code, _, err = run_cli("dreamfit", *common, "--true-cfg", "3", "--dtype", dtype, "--out", str(out))
        assert code == 0, err
        assert json.loads(Image.open(out).text["diffbase"])["true_cfg"] == 3.0
    assert Image.open(tmp_path / "cfg-float32.png").tobytes() != Image.open(tmp_path / "garment.png").tobytes()


def test_training_reaches_the_write_pass_loras_and_saves_the_official_layout(tiny_model, tmp_path) -> None:
    from diffbase.methods import train
    from diffbase.methods.dreamfit.mechanism.checkpoint import load_dreamfit
    from tests.helpers import dreamfit_config

    config = dreamfit_config(tiny_model, tmp_path, "training.max_steps=3", "training.learning_rate=1e-2", pairs=6)
    result = train(config, show_progress=False)
    loras = result.backbone.adapters["dreamfit"]
    # every LoRA moved (the write-pass ones reach the loss only through the banks) except those whose
    # write-pass output feeds nothing: the text-stream modulation LoRA (never applied, as officially), and
    # the last single block's query and output LoRAs (only its keys and values are banked)
    last = f"single_blocks__{result.backbone.denoiser.config.num_single_layers - 1}"
    idle = {k for k, up in loras.ups.items() if up.abs().max() == 0}
    assert idle == {
        "double_blocks__0__txt_mod__lin_lora",
        f"{last}__processor__ref_qkv_lora_q",
        f"{last}__processor__ref_proj_lora",
    }
    pairs = load_dreamfit(tmp_path / "run" / "dreamfit" / "dreamfit.bin", result.backbone.denoiser)
    assert len(pairs) == len(loras.ups)
    for mode in ("garment", "pose"):  # the other references train too (pose renders from the metadata)
        config.training.dreamfit.mode = mode
        config.experiment.output_dir = str(tmp_path / mode)
        assert train(config, show_progress=False).finished


def test_tryon_keeps_the_person_outside_the_mask_and_metadata_is_complete(tiny_model, tmp_path) -> None:
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    from tests.helpers import run_cli

    person = Image.new("RGB", (32, 32), (220, 200, 180))
    ImageDraw.Draw(person).rectangle((0, 0, 31, 10), fill=(30, 120, 60))
    person.save(tmp_path / "p.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 12, 24, 28), fill=255)
    mask.save(tmp_path / "m.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "g.png")
    common = ["dreamfit", "--mode", "tryon", "--model", str(tiny_model("flux1")), "--checkpoint",
              str(dreamfit_checkpoint(tiny_model, tmp_path)), "--garment", str(tmp_path / "g.png"), "--person",
              str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"), "--prompt", "a person", "--size", "32x32",
              "--steps", "2"]  # fmt: skip
    for extra, name in (([], "kept.png"), (["--no-repaint"], "raw.png")):
        code, _, err = run_cli(*common, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
    kept, raw = (np.asarray(Image.open(tmp_path / n).convert("RGB")) for n in ("kept.png", "raw.png"))
    outside = np.asarray(mask) < 128
    assert (kept[outside] == np.asarray(person)[outside]).all()  # the person's own pixels
    assert (raw[outside] != np.asarray(person)[outside]).any() and (kept[~outside] == raw[~outside]).all()
    meta = json.loads(Image.open(tmp_path / "kept.png").text["diffbase"])
    assert meta["size"] == [32, 32] and meta["repaint"] is True


def test_validation_generates_held_out_pairs_and_logs_their_metrics(tiny_model, tmp_path) -> None:
    """loss_split holds pairs out: each check writes a grid (reference | result | person) and logs the
    fixed-noise held-out loss, the try-on L1 inside the mask and the asked-for metrics; the held-out loss is
    the same when computed twice on the same weights (comparable from check to check)."""
    import json

    from diffbase.methods import train
    from diffbase.methods.dreamfit.method import held_out_loss
    from tests.helpers import dreamfit_config

    config = dreamfit_config(tiny_model, tmp_path, "training.max_steps=2", "training.validation.loss_split=0.34",
                             "training.validation.every=1", "training.validation.steps=2",
                             "training.validation.metrics=[ssim, psnr]", "data.cache_latents=true",
                             "data.cache_text=true", pairs=6)  # fmt: skip
    result = train(config, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in checks] == [1, 2]
    for r in checks:
        assert r["val_loss"] > 0 and 0 <= r["val_masked_l1"] <= 2 and -1 <= r["val_ssim"] <= 1 and r["val_psnr"] > 0
    grids = sorted((tmp_path / "run" / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    from diffbase.methods import get

    held_out = get("dreamfit").dataset(config, True, result.backbone)
    first = held_out_loss(config, result.backbone, result.trained, held_out)
    assert first == held_out_loss(config, result.backbone, result.trained, held_out)
