"""The metrics, each computed by torchmetrics: paired (SSIM, PSNR), distributions (FID, KID over a feature
network's vectors), and similarity to references or prompts (CLIP-I, CLIP-T through torchmetrics' CLIP score;
DINO as the cosine of DINO class tokens, DreamBench's definition)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from diffbase.errors import UserError

MIN_FID = 2  # a covariance needs two samples; papers use thousands (FID is biased low below ~10k)


def ssim(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image SSIM on [0, 1] images (Gaussian window 11, sigma 1.5, as Wang et al. and torchmetrics' default)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(result, target, data_range=1.0, reduction="none")


def psnr(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB on [0, 1] images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(result, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def paired(result: torch.Tensor, target: torch.Tensor, lpips_model: Any = None) -> dict[str, float]:
    """SSIM and PSNR (and LPIPS, given its model: diffbase.metrics.lpips.model) of one [0, 1] image (3, H, W)
    against its ground truth."""
    out = {"ssim": float(ssim(result[None], target[None])[0]), "psnr": float(psnr(result[None], target[None])[0])}
    if lpips_model is not None:
        from diffbase.metrics.lpips import lpips

        out["lpips"] = float(lpips(lpips_model, result[None], target[None])[0])
    return out


def means(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each key over rows of per-image scores."""
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


class Passthrough(torch.nn.Module):
    """Features computed once, given to torchmetrics' FID and KID as their 'network' (so both share them)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def features_of(net: Any, images: list[torch.Tensor], batch: int = 16) -> torch.Tensor:
    """The network's vector of every image (images of one size are batched together)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for indices in same_size_batches(images, batch):
        vectors = net(torch.stack([images[i] for i in indices]))
        for i, v in zip(indices, vectors, strict=True):
            out[i] = v.cpu().double()
    return torch.stack(out)


def same_size_batches(images: list[torch.Tensor], batch: int) -> Iterator[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch):
            yield indices[start : start + batch]


def check_counts(real: int, fake: int, key: str, need: int = MIN_FID) -> None:
    if min(real, fake) < need:
        raise UserError(f"{key}: FID and KID need at least {need} images in each set, got {real} real and {fake} "
                        "generated (papers use thousands: with few images the numbers mean little)")  # fmt: skip


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (torchmetrics' FrechetInceptionDistance over these features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Passthrough(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets; torchmetrics' KernelInceptionDistance), the subset size
    cut to the smaller set."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": these are the features, already in memory
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=Passthrough(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def distribution(net: Any, real: list[torch.Tensor], fake: list[torch.Tensor], key: str) -> dict[str, float]:
    """FID and KID (mean, std) of two image sets in `net`'s features, computed once for both."""
    check_counts(len(real), len(fake), key)
    a, b = features_of(net, real), features_of(net, fake)
    mean, std = kid(a, b)
    return {"fid": fid(a, b), "kid": mean, "kid_std": std}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair cosine similarity of two (N, D) feature sets."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def clip_scores(model: Any, processor: Any, images: list[torch.Tensor], targets: list[Any]) -> list[float]:
    """Per pair CLIP similarity (cosine of CLIP's projected embeddings) of each image with its target, a prompt
    (CLIP-T) or an image (CLIP-I), computed by torchmetrics' clip_score (which reports 100 x cosine)."""
    from torchmetrics.functional.multimodal import clip_score

    scores = []
    for image, target in zip(images, targets, strict=True):
        target = target if isinstance(target, str) else target * 255
        value = clip_score(image * 255, target, model_name_or_path=lambda: (model, processor))
        scores.append(float(value) / 100)
    return scores


def mean_clip_score(clip: tuple[Any, Any], images: list[torch.Tensor], targets: list[Any]) -> float:
    """The mean of clip_scores over the pairs: CLIP-T against prompts, CLIP-I against images. `clip`: (model,
    processor), as diffbase.metrics.features.clip_for_scores gives them."""
    values = clip_scores(*clip, images, targets)
    return sum(values) / len(values)


def dino_score(net: Any, images: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """DreamBench's DINO score: the mean cosine of the DINO class tokens of each image and its reference."""
    return float(cosine(features_of(net, images), features_of(net, references)).mean())
