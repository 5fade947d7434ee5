"""Standard VTON and CatVTON on a tiny SD1.5: what trains, the garment's effect, CatVTON's weight
layout, the data layouts, the metrics and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffbase.data.synthetic import write_dataset
from diffbase.errors import UserError
from diffbase.methods.tryon.mechanism import canvas as C
from diffbase.methods.tryon.mechanism.data import TryOnDataset, read_tryon
from diffbase.methods.tryon.mechanism.metrics import masked_l1, psnr, ssim
from diffbase.methods.tryon.mechanism.sampling import TryOnSettings, tryon
from diffbase.methods.tryon.mechanism.vton import (
    attn1_modules,
    catvton_state_dict,
    load_catvton_attention,
    prepare_unet,
    save_catvton_attention,
)
from diffbase.models.backbone import Backbone
from diffbase.models.loading import load_pipeline
from tests.helpers import run_cli


def tiny_vton(tiny_model, variant: str, seed: int = 0) -> Backbone:
    pipe, spec = load_pipeline(tiny_model("sd15"))
    prepare_unet(pipe.unet, variant)
    torch.manual_seed(seed)
    for _, module in attn1_modules(pipe.unet):  # trained-looking attention, so the variants differ from the base
        for p in module.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    return Backbone(spec, pipe)


def inputs(seed: int = 0, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    person = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    garment = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., 8:26, 6:26] = 1
    return person, garment, mask


@pytest.mark.parametrize(("variant", "channels"), [("vton", 8), ("catvton", 9)])
def test_exactly_the_attn1_projections_train(tiny_model, variant: str, channels: int) -> None:
    pipe, _ = load_pipeline(tiny_model("sd15"))
    params = prepare_unet(pipe.unet, variant)
    trains = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    expected = {
        f"{m}.{p}"
        for m, _ in attn1_modules(pipe.unet)
        for p in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
    }
    assert trains == expected and len(params) == len(expected) and all(".attn1." in n for n in trains)
    assert pipe.unet.conv_in.in_channels == channels == pipe.unet.config.in_channels


def test_info_prints_the_real_sd15_attn1_count() -> None:
    code, out, err = run_cli("info", "configs/experiments/tryon_vton_sd15.yaml")
    assert code == 0, err
    assert "49.57M" in out and "49,574,080" in out  # as CatVTON reports


@pytest.mark.parametrize("variant", ["vton", "catvton"])
def test_the_garment_half_changes_the_person_half(tiny_model, variant: str) -> None:
    bb = tiny_vton(tiny_model, variant)
    person, garment, mask = inputs()
    settings = TryOnSettings(steps=3, repaint=False)
    a = tryon(bb, variant, person, garment, mask, settings)
    b = tryon(bb, variant, person, torch.flip(garment, dims=[1]), mask, settings)  # another garment
    again = tryon(bb, variant, person, garment, mask, settings)
    assert torch.equal(a, again)  # seeded
    assert (a - b).abs().mean() > 1e-3
    # and at the UNet: changing only the garment half of the condition changes the person-half prediction
    unet, z = bb.denoiser, torch.randn(1, 4, 8, 4)
    masks = C.mask_canvas(mask, (4, 4))
    noisy = torch.randn(1, 4, 8, 4)
    text = None if variant == "catvton" else torch.zeros(1, 77, 32)
    with torch.no_grad():
        outs = [
            C.top_half(
                unet(
                    C.unet_input(variant, noisy, masks, torch.cat([z[:, :, :4], g], dim=-2)),
                    500,
                    encoder_hidden_states=text,
                ).sample
            )
            for g in (z[:, :, 4:], torch.zeros(1, 4, 4, 4))
        ]
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_catvton_weights_load_with_every_key_used(tiny_model, tmp_path: Path) -> None:
    source = tiny_vton(tiny_model, "catvton", seed=1)
    folder = tmp_path / "mix-48k-1024"
    save_catvton_attention(source.denoiser, folder)
    state = load_file(str(folder / "attention" / "model.safetensors"))
    n = len(attn1_modules(source.denoiser))
    assert len(state) == 5 * n and {k.split(".")[0] for k in state} == {str(8 * r) for r in range(n)}
    assert "0.to_out.0.bias" in state and f"{8 * (n - 1)}.to_q.weight" in state
    target = tiny_vton(tiny_model, "catvton", seed=2)
    load_catvton_attention(target.denoiser, folder)  # raises on any missing or unused key
    loaded = catvton_state_dict(target.denoiser)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    person, garment, mask = inputs()
    settings = TryOnSettings(steps=2)
    assert torch.equal(
        tryon(source, "catvton", person, garment, mask, settings),
        tryon(target, "catvton", person, garment, mask, settings),
    )
    broken = dict(state)
    broken.pop("0.to_q.weight")
    broken["999.to_q.weight"] = state[f"{8 * (n - 1)}.to_q.weight"].clone()
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="1 missing .*0.to_q.weight.*1 unused .*999.to_q.weight"):
        load_catvton_attention(target.denoiser, tmp_path / "broken.safetensors")


def test_data_layouts_and_paired_ground_truth(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "synth", 6, 3, size=(32, 32))
    (root / "train" / "metadata.json").unlink()  # read the VITON-HD layout itself
    paired = read_tryon(root, "train")
    assert len(paired) == 6 and all(r.target == r.image for r in paired)  # the person is the image slot
    (root / "train_pairs.txt").write_text("00000.png 00001.png\n00001.png 00002.png\n")
    unpaired = read_tryon(root, "train", paired=False)
    assert [r.garment.name for r in unpaired] == ["00001.png", "00002.png"] and unpaired[0].target is None
    # DressCode: <category>/images/<id>_0 (person) and <id>_1 (garment), masks in agnostic_masks/
    dc = tmp_path / "dresscode" / "dresses"
    (dc / "images").mkdir(parents=True)
    (dc / "agnostic_masks").mkdir()
    for i in range(2):
        Image.new("RGB", (24, 32), "red").save(dc / "images" / f"{i:06d}_0.jpg")
        Image.new("RGB", (24, 32), "blue").save(dc / "images" / f"{i:06d}_1.jpg")
        Image.new("L", (24, 32), 255).save(dc / "agnostic_masks" / f"{i:06d}_0.png")
    (dc / "test_pairs_paired.txt").write_text("000000_0.jpg 000000_1.jpg\n000001_0.jpg 000001_1.jpg\n")
    records = read_tryon(tmp_path / "dresscode", "test")
    assert [r.garment.name for r in records] == ["000000_1.jpg", "000001_1.jpg"] and records[0].caption == "dresses"
    # metadata.json with a box instead of a mask
    meta = tmp_path / "meta"
    meta.mkdir()
    Image.new("RGB", (40, 40), "white").save(meta / "p.png")
    Image.new("RGB", (40, 40), "green").save(meta / "g.png")
    (meta / "metadata.json").write_text(json.dumps([{"person": "p.png", "garment": "g.png", "box": [10, 10, 29, 29]}]))
    item = TryOnDataset(read_tryon(meta, "train"), (20, 20))[0]
    assert item["person_mask"].sum() == 100 and item["person_mask"][0, 5, 5] == 1 and item["person_mask"][0, 0, 0] == 0
    (meta / "metadata.json").write_text(json.dumps([{"person": "p.png", "garment": "g.png"}]))
    with pytest.raises(UserError, match="needs a 'mask' image or a 'box'"):
        read_tryon(meta, "train")


def test_metrics_score_a_perfect_result_perfectly_and_a_baseline_as_by_hand() -> None:
    person, garment, mask = inputs()
    assert masked_l1(person, person, mask).item() == 0 and ssim(person, person).item() == pytest.approx(1.0)
    assert psnr(person, person).item() == pytest.approx(100.0)
    grey = torch.zeros_like(person)  # the masked area left grey
    by_hand = (person.abs() * mask).sum() / (mask.sum() * 3)
    assert masked_l1(grey, person, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert psnr(grey, person).item() == pytest.approx(10 * torch.log10(1 / ((person / 2) ** 2).mean()).item(), rel=1e-5)
    assert ssim(grey, person).item() < 0.1


def test_tryon_and_eval_commands(tiny_model, tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "synth", 2, 2, size=(32, 32))
    person = root / "test" / "image" / "00000.png"
    out = tmp_path / "result.png"
    code, stdout, err = run_cli(
        "tryon",
        "--method",
        "catvton",
        "--model",
        str(tiny_model("sd15")),
        "--person",
        str(person),
        "--mask",
        str(root / "test" / "agnostic-mask" / "00000_mask.png"),
        "--garment",
        str(root / "test" / "cloth" / "00001.png"),
        "--size",
        "32x32",
        "--steps",
        "2",
        "--out",
        str(out),
        "--grid",
        str(tmp_path / "grid.png"),
    )
    assert code == 0, err
    result, original = Image.open(out), Image.open(person)
    assert result.size == original.size and json.loads(result.text["diffbase"])["method"] == "catvton"
    grid = Image.open(tmp_path / "grid.png")  # person | garment | result, each a labelled cell
    assert grid.width >= 3 * 192 > 2 * 192 >= grid.height
    code, stdout, err = run_cli(
        "eval",
        "tryon",
        "--method",
        "vton",
        "--model",
        str(tiny_model("sd15")),
        "--data",
        str(root),
        "--size",
        "32x32",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "eval"),
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pairs"] == 2 and {"ssim", "psnr", "masked_l1"} <= set(metrics)
    assert "FID, KID: give --features" in stdout and "LPIPS: give --lpips" in stdout
    assert (tmp_path / "eval" / "grid.png").exists()
    code, _, err = run_cli(
        "tryon",
        "--model",
        str(tiny_model("sd15")),
        "--person",
        str(person),
        "--garment",
        str(person),
        "--out",
        str(out),
    )
    assert code == 2 and "--mask / --box" in err


def test_vton_training_resumes_exactly_and_exports_catvton_layout(tiny_model, tmp_path: Path) -> None:
    from diffbase.config import configs_dir, load_config
    from diffbase.methods import train

    root = write_dataset(tmp_path / "synth", 8, 2, size=(32, 32))

    def config(out: str, *extra: str):
        return load_config(
            configs_dir() / "models" / "sd15_tiny.yaml",
            [
                f"model.pretrained_path={tiny_model('sd15')}",
                f"data.train_path={root}",
                "training.method=vton",
                "training.vton.size=[32,32]",
                "training.max_steps=4",
                "training.batch_size=2",
                "training.checkpoint_every=2",
                f"experiment.output_dir={tmp_path / out}",
                "training.learning_rate=1e-3",
                *extra,
            ],
        )

    whole = train(config("a"), show_progress=False)
    # the cache (posteriors of person, masked person and garment; the latent mask): the same draws and
    # losses, with held-out validation still running on pixels; a second run reuses every entry
    cached = config("c", "data.cache_latents=true", "data.cache_text=true", "training.validation.loss_split=0.25",
                    "training.validation.every=2", "training.validation.metrics=[ssim, psnr]")  # fmt: skip
    cached_run = train(cached, show_progress=False)
    uncached_run = train(config("d", "training.validation.loss_split=0.25"), show_progress=False)
    assert cached_run.losses == pytest.approx(uncached_run.losses, rel=1e-5)
    assert list((tmp_path / "c" / "validation").glob("*.png"))
    logged = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    paired = [r for r in logged if "val_ssim" in r]  # against the held-out ground truths, at steps 2 and 4
    assert [r["step"] for r in paired] == [2, 4]
    assert all(-1 <= r["val_ssim"] <= 1 and 0 < r["val_psnr"] < 100 for r in paired)
    cached.experiment.output_dir = str(tmp_path / "e")
    cached.data.cache_dir = str(tmp_path / "c" / "cache")
    from diffbase.methods import get
    from diffbase.training.train import load_backbone

    bb = load_backbone(cached)
    get("vton").prepare(bb, cached)
    _, stats = get("vton").cache(cached, bb, get("vton").dataset(cached, False, bb), False)
    assert stats.latents_computed == 0 and stats.latents_reused > 0
    train(config("b"), stop_after=2, show_progress=False)
    resumed = train(config("b"), resume="latest", show_progress=False)
    assert resumed.losses == whole.losses[2:]
    a, b = (load_file(str(tmp_path / r / "vton" / "attention" / "model.safetensors")) for r in ("a", "b"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "denoiser.safetensors"))
    assert all(".attn1." in k for k in ckpt)  # only what trains is checkpointed
    code, _, err = run_cli(
        "tryon",
        "--method",
        "catvton",
        "--model",
        str(tiny_model("sd15")),
        "--weights",
        str(tmp_path / "a" / "vton"),
        "--person",
        str(root / "test" / "image" / "00000.png"),
        "--box",
        "4,4,20,20",
        "--garment",
        str(root / "test" / "cloth" / "00000.png"),
        "--out",
        str(tmp_path / "x.png"),
    )
    assert code == 2 and "trained as the vton variant" in err


def test_min_snr_weighting_reaches_the_tryon_loss(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """`training.objective.snr_gamma` weights each sample by min(SNR, gamma) / SNR of its timestep."""
    import diffbase.methods.tryon.method as V
    from diffbase.config import configs_dir, load_config
    from diffbase.methods import get
    from diffbase.models import backbone as B
    from diffbase.training.train import load_backbone

    root = write_dataset(tmp_path / "synth", 4, 0, size=(32, 32))
    seen: list[torch.Tensor | None] = []
    original = V.diffusion_loss
    monkeypatch.setattr(V, "diffusion_loss", lambda *a, **k: seen.append(a[2]) or original(*a, **k))

    def loss(*extra: str) -> float:
        config = load_config(
            configs_dir() / "models" / "sd15_tiny.yaml",
            [f"model.pretrained_path={tiny_model('sd15')}", f"data.train_path={root}", "training.method=vton",
             "training.vton.size=[32,32]", "training.vton.mask_loss_weight=4", *extra],
        )  # fmt: skip
        bb = load_backbone(config)
        method = get("vton")
        trained = method.prepare(bb, config)
        data = method.dataset(config, False, bb)
        batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("person", "garment", "person_mask")}
        batch["index"] = list(range(4))
        return V.loss(config, bb, trained, batch, None, 3)[0].item()

    plain, huge, gamma = loss(), loss("training.objective.snr_gamma=1e12"), loss("training.objective.snr_gamma=1")
    assert seen[0] is None and torch.equal(seen[1], torch.ones(4))
    assert huge == pytest.approx(plain, rel=1e-6) and gamma < plain
    w = seen[2]
    assert ((w > 0) & (w <= 1)).all() and (w < 1).any()
    snrs = B.ddpm_alphas_cumprod(load_backbone(load_config(configs_dir() / "models" / "sd15_tiny.yaml",
                                 [f"model.pretrained_path={tiny_model('sd15')}"])))  # fmt: skip
    snrs = snrs / (1 - snrs)
    for weight in w[w < 1]:  # each weight is 1 / SNR(t) of a timestep of the schedule
        assert (snrs - 1 / weight).abs().min() < 1e-3 * (1 / weight)
