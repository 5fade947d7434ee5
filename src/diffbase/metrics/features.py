"""Feature networks from local paths (`dino:DIR`, `clip:DIR`, `inception:FILE`): images in [0, 1] to one vector
each, with the network's own preprocessing (its image processor's resize, crop and normalisation)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.models.folders import local_pretrained

KINDS = ("dino", "clip", "inception")


@dataclass
class FeatureNet:
    """`kind` and the callable from a batch of images (B, 3, H, W in [0, 1]) to features (B, D)."""

    kind: str
    path: str
    embed: Any

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embed(images).float()


def parse(spec: str, key: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS:
        raise UserError(f"{key}: expected KIND:PATH with KIND one of {', '.join(KINDS)} (dino:/models/dinov2-base), "
                        f"got {spec!r}")  # fmt: skip
    return kind, path


def load(spec: str, key: str = "--features", device: str = "cpu") -> FeatureNet:
    """The network `spec` names (`dino:DIR`, `clip:DIR`: transformers folders; `inception:FILE`: the FID Inception
    weights file, through torch-fidelity)."""
    kind, path = parse(spec, key)
    if kind == "inception":
        return FeatureNet(kind, path, inception(path, key, device))
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{key}: {folder}: not a folder (a local transformers {kind.upper()} model with its image "
                        "processor; diffbase downloads nothing)")  # fmt: skip
    model, processor = transformers_model(folder, kind, key, device)
    if kind == "clip":
        return FeatureNet(kind, path, lambda x: clip_image_features(model, processor, x))
    return FeatureNet(kind, path, lambda x: dino_features(model, processor, x))


def transformers_model(folder: Path, kind: str, key: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel

    model, processor = local_pretrained(folder, key, f"a {kind.upper()} model folder with its image processor",
                                        CLIPModel if kind == "clip" else AutoModel, AutoImageProcessor)  # fmt: skip
    return model.eval().to(device), processor


def pixels(processor: Any, images: torch.Tensor, device: Any) -> torch.Tensor:
    """The processor's resize, crop and normalisation of [0, 1] images (no rescaling: they are already)."""
    inputs = processor(images=list(images.cpu()), do_rescale=False, return_tensors="pt")
    return inputs["pixel_values"].to(device)


def dino_features(model: Any, processor: Any, images: torch.Tensor) -> torch.Tensor:
    """The class token of the last layer (DreamBench's DINO score; DINOv2's is after its final norm)."""
    out = model(pixel_values=pixels(processor, images, model.device))
    return out.last_hidden_state[:, 0]


def clip_image_features(model: Any, processor: Any, images: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embedding (unnormalised)."""
    return tensor(model.get_image_features(pixel_values=pixels(processor, images, model.device)))


def tensor(out: Any) -> torch.Tensor:
    """transformers 5's get_*_features return an output whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def inception(path: str, key: str, device: str) -> Any:
    """FID's Inception (pt_inception-2015-12-05) from its weights file, through torch-fidelity, which needs
    torchvision (a GPU box's torch has it; this project's CPU torch cannot take it)."""
    if not Path(path).is_file():
        raise UserError(f"{key}: {path}: not a file (the FID Inception weights, pt_inception-2015-12-05-6726825d.pth)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(
            f"{key}: inception needs torch-fidelity and torchvision (pip install torch-fidelity "
            "torchvision, matching your torch); or use dino:DIR (Fréchet DINOv2 distance)"
        ) from None
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    net = net.eval().to(device)
    return lambda x: net((x * 255).round().clamp(0, 255).to(torch.uint8).to(device))[0]


@functools.cache
def random_dino(seed: int = 0) -> FeatureNet:
    """A small DINOv2 with random weights (seeded; built once per seed), for the demo and benchmarks on a machine without a
    feature network. Its FID / KID exercise the pipeline and compare runs with each other; they are labelled as such
    and are not comparable with any paper's."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=56, patch_size=14)  # fmt: skip
    model = Dinov2Model(config).eval()
    torch.random.set_rng_state(generator_state)
    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    return FeatureNet("dino", "random weights", lambda x: dino_features(model, processor, x))


class ProjectedCLIP(torch.nn.Module):
    """A CLIP model whose get_image_features / get_text_features return tensors, as torchmetrics' CLIP score
    expects (transformers 5 returns an output object)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor(self.model.get_text_features(*args, **kwargs))


def clip_for_scores(folder: str, key: str = "--clip") -> tuple[Any, Any]:
    """(model, processor) for torchmetrics' CLIP score from a local CLIP folder (with its tokenizer)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{key}: {path}: not a folder (a local CLIP model with its processor and tokenizer)")
    model, processor = local_pretrained(
        path, key, "a CLIP folder with processor and tokenizer", CLIPModel, CLIPProcessor
    )
    return ProjectedCLIP(model.eval()), processor
