"""Evaluation metrics (`diffbase eval ...`): each agrees with a second computation of the same number from the
same images and features (scikit-image's SSIM, scipy's matrix square root for FID, the unbiased MMD formula for
KID, transformers' own CLIP and DINO embeddings, the face recognizer's own embeddings of the same aligned crops),
and bad input is one line with exit code 2. The feature networks are random-weight DINOv2 and CLIP folders and a
toy insightface pack built here, so the figures test the plumbing, not quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import draw_face, face_landmarks, run_cli, tiny_clip, tiny_dino, tiny_face_pack


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


def used_runtime(monkeypatch) -> list[bool]:
    """Each Runtime.use call's `backend` (the call still runs): the eval commands set up their model as the
    commands they measure do (--attention, --compile)."""
    from diffbase.runtime import Runtime

    calls: list[bool] = []
    real = Runtime.use
    monkeypatch.setattr(
        Runtime, "use", lambda self, models, backend=True: calls.append(backend) or real(self, models, backend)
    )
    return calls


def test_eval_tryon_computes_fid_and_kid_with_a_feature_network(tmp_path, tiny_model, nets, monkeypatch) -> None:
    from diffbase.data.synthetic import write_dataset

    used = used_runtime(monkeypatch)
    root = write_dataset(tmp_path / "synth", 4, 4, seed=0, size=(32, 32))
    code, _, err = run_cli("eval", "tryon", "--model", str(tiny_model("sd15")), "--data", str(root), "--size", "32x32",
                           "--steps", "2", "--features", f"dino:{nets['dino']}", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ssim", "psnr", "fid", "kid"} <= set(report) and report["features"].startswith("dino:")
    assert used == [False]  # try-on keeps its own attention processors, as `tryon` does


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


def test_an_unreadable_image_or_an_output_folder_that_cannot_be_written_is_one_line(tmp_path) -> None:
    write_set(tmp_path / "real", 2, 0)
    write_set(tmp_path / "fake", 2, 1)
    broken = sorted((tmp_path / "fake").iterdir())[1]
    broken.write_text("not an image")  # was a BadFile traceback
    in_the_way = tmp_path / "report"
    in_the_way.write_text("x")  # was an OSError traceback after the scores were computed
    for fake, out, words in ((tmp_path / "fake", tmp_path / "out", f"error: {broken}: not a readable image"),
                             (tmp_path / "real", in_the_way, f"error: --out: {in_the_way} is a file")):  # fmt: skip
        code, _, err = run_cli(
            "eval", "images", "--real", str(tmp_path / "real"), "--fake", str(fake), "--out", str(out)
        )
        assert code == 2 and err.startswith(words) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


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
    ("overrides", "key", "experiment"),
    [
        (
            ["training.validation.metrics=[clip_t]", "training.validation.clip=/nowhere"],
            "training.validation.clip",
            "flux1_lora.yaml",
        ),
        (["training.validation.metrics=[fid]"], "training.validation.features", "flux1_lora.yaml"),
        (
            ["training.validation.metrics=[psnr]"],
            "not computed by training.method lora (it computes: clip_t, fid",
            "flux1_lora.yaml",
        ),
        (["training.validation.metrics=[dino]"], "training.validation.dino", "flux1_dreamo.yaml"),
        (["training.validation.metrics=[ssim]", "training.validation.loss_split=0"], "loss_split", "flux1_dreamo.yaml"),
        (["training.validation.metrics=[lpips]"], "training.validation.lpips", "flux1_kontext.yaml"),
        (
            ["training.validation.metrics=[lpips]", "training.validation.lpips=squeeze:/nowhere.pth"],
            "/nowhere.pth",
            "flux1_upscale_dino.yaml",
        ),
        (["training.validation.metrics=[clip_i]"], "not computed by training.method kontext", "flux1_kontext.yaml"),
    ],
)
def test_validation_metrics_settings_are_checked_before_loading(tmp_path, overrides, key, experiment) -> None:
    from tests.helpers import TINY_EXPERIMENTS

    path = next(p for p in TINY_EXPERIMENTS if p.name == experiment)
    out = tmp_path / "run"
    code, _, err = run_cli("train", str(path), f"experiment.output_dir={out}", *overrides)
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_held_out_metrics_are_logged_during_dreamo_training(tmp_path, nets) -> None:
    """DreamO's validation logs the paired metrics against the targets and the reference metrics against its
    references and captions; the plot has a panel each."""
    from diffbase.metrics.lpips import BUILDERS
    from tests.helpers import TINY_EXPERIMENTS, train_tiny

    torch.save({f"features.{k}": v for k, v in BUILDERS["squeeze"]().state_dict().items()}, tmp_path / "squeeze.pth")
    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_dreamo.yaml")
    code, _, err = train_tiny(path, tmp_path / "run", 1, "training.validation.every=1",
                              "training.validation.metrics=[ssim, psnr, lpips, clip_i, dino, clip_t]",
                              f"training.validation.lpips=squeeze:{tmp_path / 'squeeze.pth'}",
                              f"training.validation.clip={nets['clip']}", f"training.validation.dino={nets['dino']}")  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "val_ssim" in r)
    assert -1 <= logged["val_ssim"] <= 1 and 0 < logged["val_psnr"] < 100 and logged["val_lpips"] >= 0
    assert all(0 <= logged[k] <= 1 for k in ("val_clip_i", "val_clip_t")) and -1 <= logged["val_dino"] <= 1
    assert (tmp_path / "run" / "validation_metrics.png").is_file()


def test_held_out_metric_functions_follow_their_definitions(nets) -> None:
    """paired_metrics are the per-image means of diffbase.metrics.scores; reference_metrics compare each result
    with each of its references (identical images: CLIP-I and DINO 1, a different one below)."""
    from types import SimpleNamespace

    from diffbase.metrics import scores
    from diffbase.training.validation import paired_metrics, reference_metrics, same_size

    def to_pil(x: torch.Tensor) -> Image.Image:
        return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(3, 32, 32, generator=g) for _ in range(3))
    v = SimpleNamespace(metrics=["ssim", "psnr", "clip_i", "dino"], clip=str(nets["clip"]), dino=str(nets["dino"]),
                        lpips=None)  # fmt: skip
    config = SimpleNamespace(training=SimpleNamespace(validation=v))
    got = paired_metrics(config, [a, b], [c, c])
    want = scores.means([scores.paired(a, c), scores.paired(b, c)])
    assert got == pytest.approx({"val_ssim": want["ssim"], "val_psnr": want["psnr"]}, rel=1e-6)
    # a result a pixel short of its ground truth (a pipeline's multiple-of-16 floor) is resized to it, not a crash
    short = torch.nn.functional.interpolate(a[None], size=(31, 31), mode="bilinear")[0]
    assert paired_metrics(config, [short], [c])["val_psnr"] == pytest.approx(
        scores.paired(same_size(short, c), c)["psnr"], rel=1e-6
    )
    assert same_size(short, c).shape == c.shape and same_size(a, c) is a
    same = reference_metrics(config, [to_pil(a)], [[to_pil(a)]], ["x"])
    assert same["val_clip_i"] == pytest.approx(1, abs=1e-4) and same["val_dino"] == pytest.approx(1, abs=1e-6)
    mixed = reference_metrics(config, [to_pil(a)], [[to_pil(a), to_pil(b)]], ["x"])
    assert mixed["val_dino"] < 1 and mixed["val_clip_i"] < same["val_clip_i"] and "val_clip_t" not in mixed


def test_eval_upscale_compares_the_upscaler_and_bicubic_with_the_originals(tmp_path, tiny_model, monkeypatch) -> None:
    from pathlib import Path

    from diffbase.metrics import images, scores

    originals = Path(__file__).resolve().parents[1] / "examples" / "dreamo" / "target"
    folder = tmp_path / "originals"
    folder.mkdir()
    for f in sorted(originals.glob("*.png"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    from diffbase.metrics.lpips import BUILDERS

    torch.save({f"features.{k}": v for k, v in BUILDERS["squeeze"]().state_dict().items()}, tmp_path / "squeeze.pth")
    used = used_runtime(monkeypatch)
    code, out, err = run_cli("eval", "upscale", "--originals", str(folder), "--model", str(tiny_model("flux1")),
                             "--steps", "2", "--lpips", f"squeeze:{tmp_path / 'squeeze.pth'}",
                             "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 2 and (tmp_path / "eval" / "grid.png").is_file()
    assert used == [True]
    psnrs = []
    for file in sorted(folder.glob("*.png")):
        original = Image.open(file).convert("RGB")
        w, h = original.size
        bicubic = original.resize((round(w / 2), round(h / 2)), Image.BICUBIC).resize((w, h), Image.BICUBIC)
        psnrs.append(float(scores.psnr(images.to_tensor(bicubic)[None], images.to_tensor(original)[None])[0]))
    assert report["bicubic_psnr"] == pytest.approx(sum(psnrs) / len(psnrs), rel=1e-6)  # the baseline row
    assert np.isfinite(report["upscaler_psnr"]) and 0 < report["upscaler_ssim"] <= 1
    assert report["upscaler_lpips"] > 0 and report["bicubic_lpips"] > 0  # random SqueezeNet: plumbing, not quality


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
    pytest.importorskip("insightface", reason="face similarity needs the face extra: pip install 'diffbase[face]'")
    return tiny_face_pack(tmp_path_factory.mktemp("face") / "pack")


def write_faces(path, *faces) -> None:
    """A 640x640 image (the detector's input size) with faces (row, col, green, identity) drawn for the toy pack."""
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    image[...] = np.linspace(40, 160, 640)[None, :, None].astype(np.uint8) * np.array([1, 1, 0], dtype=np.uint8)
    for row, col, green, identity in faces:
        draw_face(image, row, col, green, seed=identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def recognizer_embeddings(pack, file, face) -> tuple[np.ndarray, np.ndarray]:
    """The second route: the crop aligned on the landmarks the toy detector is built to report (insightface's
    norm_crop), embedded by the recognizer's own ONNX session (ArcFaceONNX.get_feat) and by torch from the ONNX
    file's weights (RGB, (x - 127.5) / 127.5)."""
    import cv2
    import onnx
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils.face_align import norm_crop
    from onnx import numpy_helper

    crop = norm_crop(cv2.imread(str(file)), face_landmarks(*face[:3]), 112)
    onnx_file = str(pack / "w600k_tiny.onnx")
    own = ArcFaceONNX(onnx_file).get_feat(crop)[0]
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t)).double() for t in onnx.load(onnx_file).graph.initializer}
    x = (torch.from_numpy(crop[:, :, ::-1].copy()).permute(2, 0, 1)[None].double() - 127.5) / 127.5
    h = torch.relu(torch.nn.functional.conv2d(x, w["conv.w"], w["conv.b"], stride=8)).flatten(1)
    return own, (h @ w["fc.w"] + w["fc.b"])[0].numpy()


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_face_similarity_agrees_with_the_recognizers_own_embeddings_of_the_same_crops(tmp_path, nets, face_pack,
                                                                                      monkeypatch) -> None:  # fmt: skip
    import insightface.app.face_analysis
    import insightface.model_zoo.model_zoo
    import insightface.utils.storage

    def no_download(*args, **kwargs):
        raise AssertionError(f"insightface tried to download {args}")

    for module, name in ((insightface.app.face_analysis, "ensure_available"), (insightface.utils.storage, "download"),
                         (insightface.utils.storage, "download_file"), (insightface.model_zoo.model_zoo, "download_onnx")):  # fmt: skip
        monkeypatch.setattr(module, name, no_download)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res, ref = tmp_path / "results" / "id", tmp_path / "refs" / "id"
    faces = {  # name: (the result's faces, the reference's faces), each (row, col, green: the size, identity)
        "a": ([(9, 9, 200, 1)], [(6, 12, 90, 1)]),
        "b": ([(10, 10, 150, 2)], [(10, 10, 150, 2)]),  # the same image: 1
        "c": ([(3, 3, 0, 3), (12, 12, 255, 4)], [(8, 8, 180, 4)]),  # two faces: the largest counts
        "d": ([], [(9, 9, 128, 5)]),  # no face in the result
        "e": ([(9, 9, 128, 6)], []),  # none in the reference
    }
    for name, (in_result, in_reference) in faces.items():
        write_faces(res / f"{name}.png", *in_result)
        write_faces(ref / f"{name}.png", *in_reference)
    write_faces(tmp_path / "results" / "ip" / "x.png")  # a task without faces: counted, no mean
    write_faces(tmp_path / "refs" / "ip" / "x.png")
    code, out, err = run_cli("eval", "customize", "--results", str(tmp_path / "results"), "--references",
                             str(tmp_path / "refs"), "--clip", str(nets["clip"]), "--face", str(face_pack),
                             "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    got = report["id"]
    assert got["face_pairs"] == 3 and got["face_missing"] == 2 and "id.face_sim" in out
    assert report["ip"]["face_pairs"] == 0 and report["ip"]["face_missing"] == 1 and "face_sim" not in report["ip"]
    expected, own_routes = [], []
    for name, face_in_result in (("a", 0), ("b", 0), ("c", 1)):
        own_a, torch_a = recognizer_embeddings(face_pack, res / f"{name}.png", faces[name][0][face_in_result])
        own_b, torch_b = recognizer_embeddings(face_pack, ref / f"{name}.png", faces[name][1][0])
        np.testing.assert_allclose(own_a, torch_a, rtol=1e-4, atol=1e-5)  # onnxruntime's graph = the weights' maths
        expected.append(cos(torch_a, torch_b))
        own_routes.append(cos(own_a, own_b))
    assert expected[1] == pytest.approx(1.0, abs=1e-9)
    assert got["face_sim"] == pytest.approx(float(np.mean(own_routes)), abs=1e-6)  # the same crops, the same session
    assert got["face_sim"] == pytest.approx(float(np.mean(expected)), abs=1e-5)  # torch in float64 on its weights
    _, small = recognizer_embeddings(face_pack, res / "c.png", faces["c"][0][0])
    _, reference = recognizer_embeddings(face_pack, ref / "c.png", faces["c"][1][0])
    wrong = np.mean([expected[0], expected[1], cos(small, reference)])
    assert abs(got["face_sim"] - wrong) > 1e-3  # the smaller face of c would have given another number
    assert not (tmp_path / "home" / ".insightface").exists()


def test_style_similarity_is_clip_i_against_the_style_references(tmp_path, nets) -> None:
    from transformers import CLIPModel, CLIPProcessor

    results = write_set(tmp_path / "results" / "style", 3, 2)
    write_set(tmp_path / "refs" / "style", 3, 3)
    write_set(tmp_path / "results" / "ip", 2, 4)
    write_set(tmp_path / "refs" / "ip", 2, 5)
    style = write_set(tmp_path / "styles" / "style", 1, 6, shift=30)  # one style reference for all
    code, out, err = run_cli("eval", "customize", "--results", str(tmp_path / "results"), "--references",
                             str(tmp_path / "refs"), "--clip", str(nets["clip"]), "--style", str(tmp_path / "styles"),
                             "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "style_clip_i" not in report["ip"] and "style.style_clip_i" in out  # ip has no DIR/ip
    model, processor = CLIPModel.from_pretrained(nets["clip"]), CLIPProcessor.from_pretrained(nets["clip"])
    with torch.no_grad():
        a = model.get_image_features(**processor(images=[Image.open(f).convert("RGB") for f in results],
                                                 return_tensors="pt"))  # fmt: skip
        b = model.get_image_features(**processor(images=[Image.open(style[0]).convert("RGB")], return_tensors="pt"))
    a, b = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (a, b))
    expected = torch.nn.functional.cosine_similarity(a, b).clamp_min(0).mean()
    assert report["style"]["style_clip_i"] == pytest.approx(float(expected), abs=1e-4)
    assert report["style"]["style_clip_i"] != pytest.approx(report["style"]["clip_i"], abs=1e-4)  # not the references


def customize_inputs(tmp_path) -> list[str]:
    write_set(tmp_path / "results", 2, 0)
    write_set(tmp_path / "refs", 2, 1)
    return ["eval", "customize", "--results", str(tmp_path / "results"), "--references", str(tmp_path / "refs")]


@pytest.mark.parametrize(
    ("pack", "words"),
    [
        ("missing", "not a folder"),
        ("empty", "no .onnx files"),
        ("nested", "its ONNX files are in"),  # antelopev2's zip holds a second antelopev2 folder
        ("no_insightface", "pip install 'diffbase[face]'"),
    ],
)
def test_bad_face_packs_are_one_line_before_any_model_loads(tmp_path, nets, monkeypatch, pack, words) -> None:
    import sys

    from diffbase.metrics import features

    folder = tmp_path / "pack"
    if pack == "empty":
        folder.mkdir()
    if pack == "nested":
        (folder / "antelopev2").mkdir(parents=True)
        (folder / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    if pack == "no_insightface":
        folder.mkdir()
        (folder / "det.onnx").write_bytes(b"")
        monkeypatch.setitem(sys.modules, "insightface", None)
        monkeypatch.setitem(sys.modules, "insightface.app", None)
    monkeypatch.setattr(features, "clip_for_scores", lambda *a, **k: pytest.fail("CLIP loaded before --face failed"))
    code, _, err = run_cli(*customize_inputs(tmp_path), "--clip", str(nets["clip"]), "--face", str(folder))
    assert code == 2 and err.startswith(
        f"error: --face: {folder}" if pack != "no_insightface" else "error: --face: face"
    )
    assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (["w600k_tiny.onnx"], "no face detector"),
        (["det_tiny.onnx"], "no ArcFace recognition model"),
        (["det_tiny.onnx", "broken.onnx"], "insightface could not load it"),
    ],
)
def test_incomplete_face_packs_are_one_line(tmp_path, nets, face_pack, monkeypatch, files, words) -> None:
    from diffbase.metrics import features

    folder = tmp_path / "pack"
    folder.mkdir()
    for name in files:
        source = face_pack / name
        (folder / name).write_bytes(source.read_bytes() if source.is_file() else b"not a model")
    monkeypatch.setattr(features, "clip_for_scores", lambda *a, **k: pytest.fail("CLIP loaded before --face failed"))
    code, _, err = run_cli(*customize_inputs(tmp_path), "--clip", str(nets["clip"]), "--face", str(folder))
    assert code == 2 and err.startswith(f"error: --face: {folder.resolve()}") and words in err
    assert len(err.strip().splitlines()) == 1


def test_bad_style_references_are_one_line(tmp_path, nets) -> None:
    code, _, err = run_cli(*customize_inputs(tmp_path), "--clip", str(nets["clip"]), "--style", "/nowhere")
    assert code == 2 and "--style: /nowhere: not a folder of images" in err and len(err.strip().splitlines()) == 1
    write_set(tmp_path / "tasks" / "id", 1, 0)
    write_set(tmp_path / "task_refs" / "id", 1, 0)
    write_set(tmp_path / "flat_styles", 1, 0)
    code, _, err = run_cli("eval", "customize", "--results", str(tmp_path / "tasks"), "--references",
                           str(tmp_path / "task_refs"), "--clip", str(nets["clip"]), "--style",
                           str(tmp_path / "flat_styles"))  # fmt: skip
    assert code == 2 and "no subfolder named after a task (id)" in err and len(err.strip().splitlines()) == 1
