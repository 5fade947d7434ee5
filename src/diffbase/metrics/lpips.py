"""LPIPS (Zhang et al. 2018) as torchmetrics computes it, on a backbone read from a file the user names.

torchmetrics' LPIPS takes its backbone (VGG16, AlexNet or SqueezeNet 1.1 `features`) from torchvision, and
downloads its weights. diffbase downloads nothing, and the CPU torch of this project cannot import torchvision
(its compiled operators are built for another torch). So diffbase builds the same `features` stacks in plain
torch, with torchvision's module layout and state-dict names, loads the torchvision weight file the user gives
(`squeezenet1_1-b8a52dc0.pth`, `vgg16-397923af.pth`, `alexnet-owt-7be5be79.pth`, or a .safetensors of the same
keys), and hands them to torchmetrics' own LPIPS module (its slicing, scaling layer, learned linear heads shipped
inside torchmetrics, normalisation and averaging). Where torchvision imports, a test checks these stacks give
torchvision's activations.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffbase.errors import UserError

NETS = ("squeeze", "alex", "vgg")  # CatVTON's eval.py uses squeeze
FILES = {"squeeze": "squeezenet1_1-b8a52dc0.pth", "alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_PATCH = threading.Lock()  # torchmetrics reads its backbone through a module-level function, swapped while building


class Fire(nn.Module):
    """SqueezeNet's fire module, with torchvision's names (squeeze, expand1x1, expand3x3)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))],
                         1)  # fmt: skip


def squeezenet1_1_features() -> nn.Sequential:
    def pool() -> nn.Module:
        return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )  # fmt: skip


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )  # fmt: skip


def vgg16_features() -> nn.Sequential:
    """VGG16 (configuration D, no batch norm): 3x3 convolutions, ReLU, 2x2 max pools."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(channels, int(width), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        channels = int(width)
    return nn.Sequential(*layers)


BUILDERS = {"squeeze": squeezenet1_1_features, "alex": alexnet_features, "vgg": vgg16_features}


def parse(spec: str, key: str) -> tuple[str, Path]:
    """`NET:FILE` (squeeze:/models/squeezenet1_1-b8a52dc0.pth) with the file checked before anything loads."""
    net, sep, path = spec.partition(":")
    if not sep or net not in NETS:
        raise UserError(f"{key}: expected NET:FILE with NET one of {', '.join(NETS)} and FILE torchvision's weights "
                        f"of it (squeeze:/models/{FILES['squeeze']}), got {spec!r}")  # fmt: skip
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{key}: {file}: no such file (torchvision's {FILES[net]} or a .safetensors of its keys; "
                        "diffbase downloads nothing)")  # fmt: skip
    return net, file


def backbone(net: str, file: Path, key: str) -> nn.Sequential:
    """The `features` stack of `net` with the weights of `file` (a torchvision classifier checkpoint: only its
    `features.*` entries are read)."""
    features = BUILDERS[net]()
    state = read_state(file, key)
    found = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    wanted = features.state_dict()
    bad = sorted(set(wanted) ^ set(found)) or [k for k in wanted if wanted[k].shape != found[k].shape]
    if bad:
        raise UserError(f"{key}: {file}: not torchvision's {FILES[net]} ({len(bad)} features.* entries missing, "
                        f"unexpected or of another shape, e.g. features.{bad[0]})")  # fmt: skip
    features.load_state_dict(found)
    return features.eval().requires_grad_(False)


def read_state(file: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a checkpoint at all
        from diffbase.errors import first_line

        raise UserError(f"{key}: {file}: cannot read it as weights ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{key}: {file}: expected a state dict of tensors, found a {type(state).__name__}")
    return state


def model(spec: str, key: str = "--lpips", device: str = "cpu") -> Any:
    """torchmetrics' LPIPS module (learned heads from torchmetrics' package files) over the named backbone."""
    from torchmetrics.functional.image import lpips as tm

    net, file = parse(spec, key)
    features = backbone(net, file, key)
    with _PATCH:
        original = tm._get_tv_model_features
        tm._get_tv_model_features = lambda name, pretrained=False: features
        try:
            built = tm._NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
        finally:
            tm._get_tv_model_features = original
    return built.to(device)


def mean_lpips(lpips_model: Any, results: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The mean LPIPS of each result against its target (one pair at a time: sizes may differ between pairs)."""
    values = [float(lpips(lpips_model, r[None], t[None])[0]) for r, t in zip(results, targets, strict=True)]
    return sum(values) / len(values)


def lpips(lpips_model: Any, result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image LPIPS of [0, 1] images (torchmetrics' forward with normalize=True: mapped to [-1, 1] first)."""
    with torch.no_grad():
        return lpips_model(result, target, normalize=True).reshape(-1)
