"""Aspect-ratio buckets: every image is resized to cover a bucket of about the target area and
cropped to it, so aspect ratios are kept; each batch comes from one bucket."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from diffbase.config import DataConfig


def resolutions(data: DataConfig) -> list[int]:
    """`data.resolution` as sorted distinct sizes: a single size is a list of one, so readers need no other case."""
    value = data.resolution
    return sorted({value} if isinstance(value, int) else set(value))


def largest_resolution(data: DataConfig) -> int:
    """The size where one is needed (validation and class images, the memory plan): the largest is the peak."""
    return resolutions(data)[-1]


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """(height, width) pairs, sides multiples of `step` within [min_side, max_side], area <= resolution^2.
    `step` 0 means no bucketing: one square bucket."""
    if step <= 0:
        return [(resolution, resolution)]
    if resolution < step:
        from diffbase.errors import UserError

        raise UserError(f"data.resolution: {resolution} is smaller than data.bucket_step ({step})")
    area = resolution * resolution
    buckets = set()
    h = max(step, -(-min_side // step) * step)  # the first multiple of step that is >= min_side
    while h <= max_side:
        w = min((area // h) // step * step, (max_side // step) * step)
        if w >= min_side and w >= step:
            buckets.add((h, w))
            buckets.add((w, h))
        h += step
    buckets.add(((resolution // step) * step,) * 2)
    return sorted(buckets)


def assign_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to the image's; larger area breaks ties."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def crop_geometry(
    width: int, height: int, bucket: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The scaled size that covers the bucket and the crop box in it (centre, or random with `rng`)."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    nw, nh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    return (nw, nh), (left, top, left + bw, top + bh)


def resize_and_crop(
    img: Image.Image, bucket: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int], tuple[int, int, int, int]]:
    """Scale so the image covers the bucket, then crop it. Returns the scaled size and the crop box
    too, so a mask or control image can be cut the same way (`same_crop`)."""
    size, box = crop_geometry(img.width, img.height, bucket, crop, rng)
    resized = img.resize(size, Image.BICUBIC) if size != img.size else img
    return resized.crop(box), size, box


def same_crop(
    img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], nearest: bool = False
) -> Image.Image:
    """Cut a companion image (mask, control) exactly as its main image was cut."""
    return img.resize(size, Image.NEAREST if nearest else Image.BICUBIC).crop(box)


class BucketBatchSampler:
    """Global batches of indices, each from one bucket, shuffled by (seed, epoch).

    Every process iterates the same global batches; with several processes each takes its slice
    of every batch, so N processes see what one process with N times the batch sees. Incomplete
    batches at the end of a bucket are dropped (`drop_last`), so every batch has `batch_size`.
    """

    def __init__(
        self, buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.buckets = {k: list(v) for k, v in buckets.items() if v}
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        out = []
        for key in sorted(self.buckets):
            items = list(self.buckets[key])
            if self.shuffle:
                rng.shuffle(items)
            out += [items[i : i + self.batch_size] for i in range(0, len(items) - self.batch_size + 1, self.batch_size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(len(v) // self.batch_size for v in self.buckets.values())
