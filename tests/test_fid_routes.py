"""FID and KID over FID's Inception (`--features inception:FILE`, torch-fidelity's network, torchmetrics' FID and
KID) against a second route, clean-fid, on the same weights file and the same images. It needs torchvision,
torch-fidelity and clean-fid, which do not install beside this project's CPU torch (torchvision's compiled
operators are built for another torch), so it skips here and runs where they import (measured on torch 2.14.1 +
torchvision 0.29.1 on a CPU: the formulas agree to 4e-6 relative on the same features; the two networks'
features differ by 0.7%, FID by 2%).

The weights are random (He-normal convolutions, unit batch-norm statistics): they test the computation, not
an FID anybody publishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def imports_or_skip() -> tuple:
    try:
        import torchvision  # noqa: F401
        from cleanfid import fid as clean_fid
        from cleanfid import inception_pytorch
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        pytest.skip(f"needs torchvision, torch-fidelity and clean-fid ({str(exc).splitlines()[0][:80]})")
    return clean_fid, inception_pytorch, FeatureExtractorInceptionV3


def random_inception_file(path, extractor) -> None:
    """A state dict of FID's Inception with random weights (torch-fidelity's names, which clean-fid's pytorch-fid
    port shares: both load it strictly)."""
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    original = extractor.load_state_dict
    extractor.load_state_dict = lambda self, state, strict=True: None  # build the module without its weights
    try:
        state = extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    finally:
        extractor.load_state_dict = original
    g = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("conv.weight") or key.startswith("fc."):
            state[key] = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        elif key.endswith("running_var"):
            state[key] = torch.ones_like(value)
    torch.save(state, path)


def write_set(folder, shift: float, seed: int, count: int = 12) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 299 * 299 * 3).reshape(299, 299, 3)  # 299 px: neither route resizes
    for i in range(count):
        pixels = np.clip(base * (0.5 + 0.05 * i) + rng.normal(shift, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_inception_fid_and_kid_agree_with_clean_fid(tmp_path, monkeypatch) -> None:
    clean_fid, inception_pytorch, extractor = imports_or_skip()
    from diffbase.metrics import features, images, scores

    weights = tmp_path / "pt_inception.pth"
    random_inception_file(weights, extractor)
    monkeypatch.setattr(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: torch.load(weights))
    write_set(tmp_path / "real", 0, 0)
    write_set(tmp_path / "fake", 30, 1)
    net = features.load(f"inception:{weights}")
    real = images.read(sorted((tmp_path / "real").glob("*.png")))
    fake = images.read(sorted((tmp_path / "fake").glob("*.png")))
    ours = scores.distribution(net, real, fake, "--features")
    a, b = scores.features_of(net, real).numpy(), scores.features_of(net, fake).numpy()
    # the formulas, on the same features: torchmetrics' (eigenvalues, float64) and clean-fid's (scipy's sqrtm)
    same_features = clean_fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours["fid"] == pytest.approx(same_features, rel=1e-4)
    assert ours["kid"] == pytest.approx(clean_fid.kernel_distance(a, b), rel=1e-6, abs=1e-12)
    # end to end: clean-fid's legacy_pytorch route (pytorch-fid's network, inputs scaled (x - 127.5) / 127.5)
    # against torch-fidelity's ((x - 128) / 128, TF1-style resize): the features differ by under 1%
    cpu = torch.device("cpu")
    options = {"mode": "legacy_pytorch", "device": cpu, "num_workers": 0, "batch_size": 4, "verbose": False}
    theirs = clean_fid.compute_fid(str(tmp_path / "real"), str(tmp_path / "fake"), **options)
    assert ours["fid"] == pytest.approx(theirs, rel=0.05)
    model = clean_fid.build_feature_extractor("legacy_pytorch", cpu, use_dataparallel=False)
    their_features = clean_fid.get_folder_features(str(tmp_path / "real"), model, num_workers=0, batch_size=4,
                                                   device=cpu, mode="legacy_pytorch", verbose=False)  # fmt: skip
    assert np.abs(their_features - a).max() <= 0.02 * np.abs(a).max()
