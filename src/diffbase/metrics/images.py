"""Image sets from folders, as float tensors in [0, 1], and the checks that make paired metrics meaningful."""

from __future__ import annotations

from pathlib import Path

import torch

from diffbase.errors import UserError

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_files(folder: str | Path, key: str) -> list[Path]:
    """The images of a folder, sorted by name; `key` (an option or config key) names it in errors."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{key}: {path}: not a folder of images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"{key}: {path}: no images ({', '.join(sorted(SUFFIXES))})")
    return files


def to_tensor(image: object) -> torch.Tensor:
    """A PIL image as (3, H, W) floats in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read(files: list[Path]) -> list[torch.Tensor]:
    """The images as tensors; an unreadable one is a one-line error naming its file (it was a traceback)."""
    from diffbase.data.images import BadFile, load_image

    try:
        return [to_tensor(load_image(f)) for f in files]
    except BadFile as err:
        raise UserError(f"{err.path}: {err.reason}") from None


def paired(real: list[Path], fake: list[Path], real_key: str, fake_key: str) -> list[tuple[Path, Path]]:
    """Real and generated images matched by file stem (every real one needs its generated one), for metrics that
    compare an image with its own ground truth."""
    by_stem = {p.stem: p for p in fake}
    missing = [p.name for p in real if p.stem not in by_stem]
    if missing:
        raise UserError(f"{fake_key}: no image named like {missing[0]} of {real_key} ({len(missing)} missing); paired "
                        "metrics compare each image with the one of the same name")  # fmt: skip
    return [(p, by_stem[p.stem]) for p in real]


def same_size(a: torch.Tensor, b: torch.Tensor, names: tuple[Path, Path]) -> None:
    if a.shape != b.shape:
        raise UserError(f"{names[1]}: {tuple(b.shape[1:])} pixels, its ground truth {names[0]} has "
                        f"{tuple(a.shape[1:])}; paired metrics need the same size")  # fmt: skip
