"""Evaluation metrics (`diffbase eval ...`): each agrees with a second computation of the same number from the
same images and features (scikit-image's SSIM, scipy's matrix square root for FID, the unbiased MMD formula for
KID, transformers' own CLIP and DINO embeddings), and bad input is one line with exit code 2. The feature
networks are random-weight DINOv2 and CLIP folders built here, so the figures test the plumbing, not quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import run_cli, tiny_clip, tiny_dino


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nets")
    return {"dino": tiny_dino(root / "dino"), "clip": tiny_clip(root / "clip")}


def write_set(folder, count: int, seed: int, size=(40, 48), shift: float = 0.0) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[0], size[1], 3)
        pixels = np.clip(base * (0.5 + 0.1 * i) + rng.normal(shift, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
        files.append(folder / f"img_{i:03d}.png")
    return files


def read(files) -> list[torch.Tensor]:
    from diffbase.metrics.images import read as read_images

    return read_images(files)


def test_ssim_and_psnr_agree_with_scikit_image(tmp_path) -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    real, fake = write_set(tmp_path / "real", 3, 0), write_set(tmp_path / "fake", 3, 1, shift=10)
    code, out, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                             "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    a = [np.asarray(Image.open(f), dtype=np.float64) / 255 for f in real]
    b = [np.asarray(Image.open(f), dtype=np.float64) / 255 for f in fake]
    ssim = np.mean([structural_similarity(x, y, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False) for x, y in zip(b, a, strict=True)])  # fmt: skip
    psnr = np.mean([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b, strict=True)])
    assert got["ssim"] == pytest.approx(ssim, abs=2e-3)  # torchmetrics pads the borders, scikit-image crops them
    assert got["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert "ssim" in out and "psnr" in out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula with scipy's matrix square root: the second route."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def mmd_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """KID over the whole sets: the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m = a.shape[0]
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())  # fmt: skip


def test_fid_and_kid_agree_with_the_formulas_on_the_same_features(tmp_path, nets) -> None:
    from diffbase.metrics import features, scores

    real, fake = write_set(tmp_path / "real", 12, 0), write_set(tmp_path / "fake", 12, 5, shift=40)
    net = features.load(f"dino:{nets['dino']}")
    a, b = scores.features_of(net, read(real)), scores.features_of(net, read(fake))
    got = scores.distribution(net, read(real), read(fake), "--features")
    assert got["fid"] == pytest.approx(frechet(a.numpy(), b.numpy()), rel=1e-4)
    assert got["kid"] == pytest.approx(mmd_unbiased(a.numpy(), b.numpy()), rel=1e-6, abs=1e-9)  # subsets = whole sets
    same = scores.distribution(net, read(real), read(real), "--features")
    assert abs(same["fid"]) < 1e-6 and got["fid"] > 1e-3  # zero for one set against itself; this one differs
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                           "--features", f"dino:{nets['dino']}", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["fid"] == pytest.approx(got["fid"], rel=1e-9) and "ssim" in report


def test_clip_t_clip_i_and_dino_agree_with_the_models_own_embeddings(tmp_path, nets) -> None:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    results = write_set(tmp_path / "results" / "ip", 3, 2)
    refs = write_set(tmp_path / "refs" / "ip", 3, 3)
    (tmp_path / "results" / "ip" / "img_000.txt").write_text("a red square")
    (tmp_path / "results" / "ip" / "img_001.txt").write_text("a blue circle on white")
    (tmp_path / "results" / "ip" / "img_002.txt").write_text("a person")
    code, _, err = run_cli("eval", "customize", "--results", str(tmp_path / "results"), "--references",
                           str(tmp_path / "refs"), "--clip", str(nets["clip"]), "--dino", str(nets["dino"]),
                           "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())["ip"]
    model, processor = CLIPModel.from_pretrained(nets["clip"]), CLIPProcessor.from_pretrained(nets["clip"])
    images = [Image.open(f).convert("RGB") for f in results]
    ref_images = [Image.open(f).convert("RGB") for f in refs]
    with torch.no_grad():
        out = model(**processor(text=["a red square", "a blue circle on white", "a person"], images=images,
                                return_tensors="pt", padding=True))  # fmt: skip
        refs_embeds = model(
            **processor(text=["x"] * 3, images=ref_images, return_tensors="pt", padding=True)
        ).image_embeds
    clip_t = (out.image_embeds * out.text_embeds).sum(-1).clamp_min(0).mean()  # torchmetrics' CLIP score: max(cos, 0)
    clip_i = (out.image_embeds * refs_embeds).sum(-1).clamp_min(0).mean()
    assert got["clip_t"] == pytest.approx(float(clip_t), abs=1e-4)
    assert got["clip_i"] == pytest.approx(float(clip_i), abs=1e-4)
    dino, dproc = AutoModel.from_pretrained(nets["dino"]), AutoImageProcessor.from_pretrained(nets["dino"])
    with torch.no_grad():
        f = dino(**dproc(images=images, return_tensors="pt")).last_hidden_state[:, 0]
        r = dino(**dproc(images=ref_images, return_tensors="pt")).last_hidden_state[:, 0]
    assert got["dino"] == pytest.approx(float(torch.nn.functional.cosine_similarity(f, r).mean()), abs=1e-4)


def test_eval_generate_gives_clip_score_and_fid(tmp_path, nets) -> None:
    write_set(tmp_path / "results", 4, 2)
    write_set(tmp_path / "real", 4, 9)
    (tmp_path / "prompts.txt").write_text("a\nb c\nd\ne f g\n")
    code, _, err = run_cli("eval", "generate", "--results", str(tmp_path / "results"), "--prompts",
                           str(tmp_path / "prompts.txt"), "--clip", str(nets["clip"]), "--real", str(tmp_path / "real"),
                           "--features", f"clip:{nets['clip']}", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"clip_t", "fid", "kid", "kid_std"} <= set(report) and report["images"] == 4


def test_eval_tryon_computes_fid_and_kid_with_a_feature_network(tmp_path, tiny_model, nets) -> None:
    from diffbase.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "synth", 4, 4, seed=0, size=(32, 32))
    code, _, err = run_cli("eval", "tryon", "--model", str(tiny_model("sd15")), "--data", str(root), "--size", "32x32",
                           "--steps", "2", "--features", f"dino:{nets['dino']}", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ssim", "psnr", "fid", "kid"} <= set(report) and report["features"].startswith("dino:")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--features", "dino:/nowhere"], "--features: /nowhere: not a folder"),
        (["--features", "vgg:/x"], "--features: expected KIND:PATH"),
        (["--features", "inception:/nowhere.pth"], "--features: /nowhere.pth: not a file"),
    ],
)
def test_bad_feature_networks_are_one_line(tmp_path, args, words) -> None:
    write_set(tmp_path / "real", 3, 0)
    write_set(tmp_path / "fake", 3, 1)
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_sets_of_other_sizes_counts_or_too_few_images_are_one_line(tmp_path, nets) -> None:
    write_set(tmp_path / "real", 3, 0)
    write_set(tmp_path / "small", 3, 1, size=(32, 32))
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "small"))
    assert code == 2 and "paired metrics need the same size" in err and len(err.strip().splitlines()) == 1
    write_set(tmp_path / "fewer", 2, 1)
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fewer"))
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    write_set(tmp_path / "one", 1, 1)
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "one"),
                           "--features", f"dino:{nets['dino']}")  # fmt: skip
    assert code == 2 and "at least 2 images" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "nothing"), "--fake", str(tmp_path / "one"))
    assert code == 2 and "--real" in err and "not a folder" in err


def test_validation_metrics_are_logged_and_plotted_during_training(tmp_path, nets) -> None:
    from diffbase.config import load_config
    from diffbase.methods import train
    from tests.helpers import SHAPES, TINY_EXPERIMENTS

    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    config = load_config(path, ["training.max_steps=2", "training.checkpoint_every=0", "training.validation.every=1",
                                "training.validation.steps=2", f"data.train_path={SHAPES}",
                                f"experiment.output_dir={tmp_path}", "training.validation.metrics=[clip_t, fid, kid]",
                                f"training.validation.clip={nets['clip']}", f"training.validation.features=dino:{nets['dino']}",
                                "training.validation.prompts=[a red square on white, a blue circle on black]"])  # fmt: skip
    train(config, show_progress=False)
    by_step: dict[int, dict] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    logged = [r for r in by_step.values() if "val_fid" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(np.isfinite(r["val_fid"]) and np.isfinite(r["val_kid"]) and 0 <= r["val_clip_t"] <= 1 for r in logged)
    assert (tmp_path / "validation_metrics.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["training.validation.metrics=[clip_t]", "training.validation.clip=/nowhere"], "training.validation.clip"),
        (["training.validation.metrics=[fid]"], "training.validation.features"),
        (["training.validation.metrics=[psnr]"], "training.validation.metrics"),
    ],
)
def test_validation_metrics_settings_are_checked_before_loading(tmp_path, overrides, key) -> None:
    from tests.helpers import TINY_EXPERIMENTS

    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    out = tmp_path / "run"
    code, _, err = run_cli("train", str(path), f"experiment.output_dir={out}", *overrides)
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_eval_upscale_compares_the_upscaler_and_bicubic_with_the_originals(tmp_path, tiny_model) -> None:
    from pathlib import Path

    from diffbase.metrics import images, scores

    originals = Path(__file__).resolve().parents[1] / "examples" / "dreamo" / "target"
    folder = tmp_path / "originals"
    folder.mkdir()
    for f in sorted(originals.glob("*.png"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    from diffbase.metrics.lpips import BUILDERS

    torch.save({f"features.{k}": v for k, v in BUILDERS["squeeze"]().state_dict().items()}, tmp_path / "squeeze.pth")
    code, out, err = run_cli("eval", "upscale", "--originals", str(folder), "--model", str(tiny_model("flux1")),
                             "--steps", "2", "--lpips", f"squeeze:{tmp_path / 'squeeze.pth'}",
                             "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 2 and (tmp_path / "eval" / "grid.png").is_file()
    psnrs = []
    for file in sorted(folder.glob("*.png")):
        original = Image.open(file).convert("RGB")
        w, h = original.size
        bicubic = original.resize((round(w / 2), round(h / 2)), Image.BICUBIC).resize((w, h), Image.BICUBIC)
        psnrs.append(float(scores.psnr(images.to_tensor(bicubic)[None], images.to_tensor(original)[None])[0]))
    assert report["bicubic_psnr"] == pytest.approx(sum(psnrs) / len(psnrs), rel=1e-6)  # the baseline row
    assert np.isfinite(report["upscaler_psnr"]) and 0 < report["upscaler_ssim"] <= 1
    assert report["upscaler_lpips"] > 0 and report["bicubic_lpips"] > 0  # random SqueezeNet: plumbing, not quality
