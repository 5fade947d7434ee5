"""LPIPS (`--lpips NET:FILE` on `eval images`, `eval tryon`, `eval upscale`): torchmetrics' LPIPS module over
diffbase's torchvision-layout backbones, read from a weights file. Checked three ways: the stacks have
torchvision's state-dict names and the parameter counts torchvision publishes for these networks; the score
equals a second computation of LPIPS's formula from the backbone's activations and torchmetrics' learned heads;
and, where torchvision imports (not beside this project's CPU torch), the stacks give torchvision's activations
and the score equals torchmetrics' own LPIPS on torchvision's network. Backbone weights are random here, so the
numbers test the computation, not perceptual quality."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_cli

# torchvision's published parameter counts (its model tables) less the classifier heads, which LPIPS drops:
# squeezenet1_1 1,235,496 - final conv 512x1000 + 1000; alexnet 61,100,840 - classifier 58,631,144;
# vgg16 138,357,544 - classifier 123,642,856.
FEATURE_PARAMS = {"squeeze": 1_235_496 - 513_000, "alex": 61_100_840 - 58_631_144, "vgg": 138_357_544 - 123_642_856}


def weights_file(folder, net: str, seed: int = 0):
    """A torchvision-style checkpoint of `net` with random features (and a classifier entry LPIPS ignores)."""
    from diffbase.metrics.lpips import BUILDERS

    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in BUILDERS[net]().state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{net}.pth")
    return folder / f"{net}.pth"


def images(seed: int, count: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g)


@pytest.mark.parametrize("net", ["squeeze", "alex", "vgg"])
def test_backbones_have_torchvisions_layout_and_parameter_counts(net) -> None:
    from diffbase.metrics.lpips import BUILDERS

    features = BUILDERS[net]()
    assert sum(p.numel() for p in features.parameters()) == FEATURE_PARAMS[net]
    names = list(features.state_dict())
    expected_first = {"squeeze": "0.weight", "alex": "0.weight", "vgg": "0.weight"}[net]
    expected_last = {"squeeze": "12.expand3x3.bias", "alex": "10.bias", "vgg": "28.bias"}[net]
    assert names[0] == expected_first and names[-1] == expected_last


def lpips_by_the_formula(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out (Zhang et al. 2018, eq. 1): the activations of both images at each layer, unit-normalised
    over channels, squared difference weighted by the learned head, averaged over space, summed over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    xa, xb = ((2 * a - 1) - shift) / scale, ((2 * b - 1) - shift) / scale
    total = torch.zeros(a.shape[0])
    outs_a, outs_b = model.net.forward(xa), model.net.forward(xb)
    for fa, fb, lin in zip(outs_a, outs_b, model.lins, strict=True):
        na = fa / torch.sqrt(1e-8 + (fa**2).sum(1, keepdim=True))
        nb = fb / torch.sqrt(1e-8 + (fb**2).sum(1, keepdim=True))
        weight = lin.model[-1].weight[0, :, 0, 0]
        total += (((na - nb) ** 2) * weight[None, :, None, None]).sum(1).mean((1, 2))
    return total


@pytest.mark.parametrize("net", ["squeeze", "alex", "vgg"])
def test_lpips_equals_its_formula_and_is_zero_for_the_same_image(tmp_path, net) -> None:
    from diffbase.metrics.lpips import lpips, model

    m = model(f"{net}:{weights_file(tmp_path, net)}")
    a, b = images(0), images(1)
    got = lpips(m, a, b)
    with torch.no_grad():
        want = lpips_by_the_formula(m, a, b)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    assert got.min() > 0 and lpips(m, a, a).abs().max() == 0
    heads = [float(lin.model[-1].weight.abs().sum()) for lin in m.lins]
    assert all(h > 0 for h in heads)  # torchmetrics' learned heads were loaded, not left at zero


def test_eval_images_reports_lpips_per_pair_and_bad_weights_are_one_line(tmp_path) -> None:
    from PIL import Image

    from diffbase.metrics.lpips import lpips, model

    file = weights_file(tmp_path / "w", "squeeze")
    for name, seed in (("real", 0), ("fake", 1)):
        (tmp_path / name).mkdir()
        for i, x in enumerate(images(seed, 2, 48)):
            Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / name / f"{i}.png")
    code, out, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                             "--lpips", f"squeeze:{file}", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    from diffbase.metrics.images import image_files, read

    real, fake = read(image_files(str(tmp_path / "real"), "r")), read(image_files(str(tmp_path / "fake"), "f"))
    m = model(f"squeeze:{file}")
    want = sum(float(lpips(m, f[None], r[None])[0]) for r, f in zip(real, fake, strict=True)) / 2
    assert report["lpips"] == pytest.approx(want, rel=1e-6) and "lpips" in out
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for spec, words in ((f"squeeze:{tmp_path / 'wrong.pth'}", "not torchvision's squeezenet1_1"),
                        (f"squeeze:{tmp_path / 'junk.pth'}", "cannot read it as weights"),
                        (f"squeeze:{tmp_path / 'none.pth'}", "no such file"),
                        (f"resnet:{file}", "expected NET:FILE")):  # fmt: skip
        code, _, err = run_cli("eval", "images", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                               "--lpips", spec, "--out", str(tmp_path / "bad"))  # fmt: skip
        assert code == 2 and "--lpips" in err and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_eval_tryon_paired_lpips_and_unpaired_refusal(tmp_path, tiny_model) -> None:
    from diffbase.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "synth", 4, 4, seed=0, size=(32, 32))
    file = weights_file(tmp_path / "w", "squeeze")
    common = ["eval", "tryon", "--model", str(tiny_model("sd15")), "--data", str(root), "--size", "32x32",
              "--steps", "2", "--lpips", f"squeeze:{file}"]  # fmt: skip
    code, out, err = run_cli(*common, "--out", str(tmp_path / "eval"))
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["lpips"] > 0 and {"ssim", "psnr"} <= set(report) and "lpips" in out
    code, _, err = run_cli(*common, "--unpaired", "--out", str(tmp_path / "unpaired"))
    assert code == 2 and "--lpips" in err and "--unpaired" in err and not (tmp_path / "unpaired").exists()


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        pytest.skip(f"torchvision does not import beside this torch ({str(exc).splitlines()[0][:80]})")
    return torchvision


@pytest.mark.parametrize("net", ["squeeze", "alex", "vgg"])
def test_equals_torchmetrics_lpips_on_torchvisions_network_where_torchvision_imports(tmp_path, net) -> None:
    tv = torchvision_or_skip()
    from torchmetrics.functional.image import lpips as tm

    from diffbase.metrics.lpips import BUILDERS, lpips, model

    name = {"squeeze": "squeezenet1_1", "alex": "alexnet", "vgg": "vgg16"}[net]
    torch.manual_seed(0)
    reference = getattr(tv.models, name)(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    ours = model(f"{net}:{tmp_path / 'tv.pth'}")
    native = tm._NoTrainLpips(net=net, pretrained=True, pnet_rand=True)  # torchvision's own network inside
    native.net.load_state_dict(ours.net.state_dict())  # same names: the same layout
    a, b = images(3, 2, 96), images(4, 2, 96)
    with torch.no_grad():
        mine = BUILDERS[net]()
        mine.load_state_dict({k.removeprefix("features."): v for k, v in reference.state_dict().items()
                              if k.startswith("features.")})  # fmt: skip
        assert torch.equal(mine.eval()(a), reference.features(a))
        assert torch.allclose(lpips(ours, a, b), native(a, b, normalize=True).reshape(-1), rtol=1e-6, atol=1e-8)
