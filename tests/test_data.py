"""The training data pipeline (src/diffbase/data): image modes, aspect-ratio buckets and the batch sampler,
deterministic items, dataset mixing, bad files, and masks/controls cut like their image."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.config import DataConfig, DatasetConfig
from diffbase.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from diffbase.data.datasets import Record, TrainDataset, build_records, read_metadata, to_tensor
from diffbase.data.images import BadFile, image_size, load_image, load_mask
from diffbase.errors import UserError
from tests.images import image_folder


def loaded(path: Path) -> torch.Tensor:
    """What training sees of an image file: (3, H, W) float in [-1, 1]."""
    t = to_tensor(load_image(path))
    assert t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 3
    assert t.min() >= -1.0 and t.max() <= 1.0
    return t


def as_uint8(t: torch.Tensor) -> np.ndarray:
    """Inverse of to_tensor for RGB: (3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((t.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def grey_blocks(width: int, height: int, block: int, seed: int) -> np.ndarray:
    """(H, W) uint8 of random blocks, each either dark (<= 60) or bright (>= 200): far from the mask threshold."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, (height // block, width // block))
    levels = np.where(cells == 1, rng.integers(200, 256, cells.shape), rng.integers(0, 61, cells.shape))
    return np.kron(levels, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def write_metadata(root: Path, entries: list[dict]) -> Path:
    (root / "metadata.json").write_text(json.dumps(entries))
    return root


# --------------------------------------------------------------------------- image modes


def test_rgb_loads_to_minus_one_one(tmp_path: Path) -> None:
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    img.putpixel((5, 3), (255, 128, 0))
    img.save(tmp_path / "rgb.png")
    t = loaded(tmp_path / "rgb.png")
    assert t.shape == (3, 4, 6)  # (C, H, W): height first
    assert torch.equal(t[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(t[:, 3, 5], torch.tensor([1.0, 128 / 127.5 - 1.0, -1.0]), atol=1e-6)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent *red*: must not come out red or black
    img.putpixel((1, 1), (0, 0, 255, 255))  # opaque blue
    img.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    img.save(tmp_path / "rgba.png")
    t = loaded(tmp_path / "rgba.png")
    assert torch.equal(t[:, 0, 0], torch.ones(3))
    assert torch.equal(t[:, 1, 1], torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.allclose(t[:, 2, 2], torch.zeros(3), atol=0.02)


def test_la_and_palette_transparency_become_white(tmp_path: Path) -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (0, 255))
    la.save(tmp_path / "la.png")
    t = loaded(tmp_path / "la.png")
    assert torch.equal(t[:, 1, 1], torch.ones(3)) and torch.equal(t[:, 0, 0], -torch.ones(3))
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((3, 3), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    t = loaded(tmp_path / "p.png")
    assert torch.equal(t[:, 0, 0], torch.ones(3)) and torch.equal(t[:, 3, 3], torch.tensor([1.0, -1.0, -1.0]))


def test_grey_becomes_three_equal_channels(tmp_path: Path) -> None:
    arr = np.array([[0, 64, 128, 255]], dtype=np.uint8).repeat(3, axis=0)
    Image.fromarray(arr, "L").save(tmp_path / "grey.png")
    t = loaded(tmp_path / "grey.png")
    assert t.shape == (3, 3, 4)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.allclose(t[0, 0], torch.tensor(arr[0], dtype=torch.float32) / 127.5 - 1.0, atol=1e-6)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 200, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    row = as_uint8(loaded(tmp_path / "deep.png"))[0, :, 0]
    # 65535 is white, 32768 is mid grey, a dark 16-bit value stays dark (PIL's own convert clips all of these to 255)
    assert row.tolist()[3] == 255 and row.tolist()[0] == 0
    assert abs(int(row[2]) - 128) <= 1 and int(row[1]) <= 2
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "white.png")
    assert torch.equal(loaded(tmp_path / "white.png"), torch.ones(3, 4, 4))


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left")],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, red_corner: str) -> None:
    stored = Image.new("RGB", (32, 16), (0, 0, 255))  # wide as stored; the red quadrant marks the stored top-left
    stored.paste((255, 0, 0), (0, 0, 16, 8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    expected_size = (16, 32) if orientation in (6, 8) else (32, 16)
    assert img.size == expected_size
    assert image_size(path) == expected_size  # header-only size (used for buckets) agrees with the decoded one
    w, h = img.size
    centres = {
        "top-left": (w // 4, h // 4),
        "top-right": (3 * w // 4, h // 4),
        "bottom-left": (w // 4, 3 * h // 4),
        "bottom-right": (3 * w // 4, 3 * h // 4),
    }
    for corner, (x, y) in centres.items():
        r, _, b = img.getpixel((x, y))
        assert (r > 200 and b < 60) == (corner == red_corner), (corner, img.getpixel((x, y)))


def test_rotated_photo_gets_a_portrait_bucket(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    stored = Image.new("RGB", (128, 64), "gray")  # stored landscape, displayed portrait
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(root / "photo.jpg", exif=exif.tobytes())
    cfg = DataConfig(train_path=str(root), resolution=64, bucket_step=8, min_bucket_side=32, max_bucket_side=128)
    ds = TrainDataset(build_records(cfg), cfg)
    bh, bw = ds.bucket_of[0]
    assert bh > bw
    assert ds[0]["pixels"].shape == (3, bh, bw)


# --------------------------------------------------------------------------- buckets


BUCKET_CONFIGS = [
    pytest.param(512, 64, 256, 1024, id="512-step64"),
    pytest.param(64, 8, 32, 128, id="64-step8"),
    pytest.param(1024, 64, 512, 2048, id="1024-step64"),
    pytest.param(512, 64, 100, 1024, id="min-not-a-multiple"),
]


@pytest.mark.parametrize(("resolution", "step", "min_side", "max_side"), BUCKET_CONFIGS)
def test_bucket_sides_and_areas(resolution: int, step: int, min_side: int, max_side: int) -> None:
    buckets = make_buckets(resolution, step, min_side, max_side)
    assert (resolution, resolution) in buckets
    assert set(buckets) == {(w, h) for h, w in buckets}  # every portrait bucket has its landscape twin
    for h, w in buckets:
        assert h % step == 0 and w % step == 0, (h, w)
        assert min_side <= h <= max_side and min_side <= w <= max_side, (h, w)
        assert h * w <= resolution**2, (h, w)
        if max(h, w) < max_side:  # a side capped at max_side may leave less area (very wide or tall buckets)
            assert 0.75 * resolution**2 <= h * w, (h, w)


def test_no_bucketing_is_one_square() -> None:
    assert make_buckets(96, 0, 32, 256) == [(96, 96)]
    with pytest.raises(UserError, match="resolution"):
        make_buckets(32, 64, 32, 256)


# (width, height) of source images
SOURCE_SIZES = [(64, 128), (128, 64), (96, 64), (300, 100), (100, 300), (80, 80), (1000, 999), (37, 211)]


@pytest.mark.parametrize(("resolution", "step", "min_side", "max_side"), BUCKET_CONFIGS[:3])
@pytest.mark.parametrize(("width", "height"), SOURCE_SIZES)
def test_assigned_bucket_has_the_nearest_aspect_ratio(
    width: int, height: int, resolution: int, step: int, min_side: int, max_side: int
) -> None:
    buckets = make_buckets(resolution, step, min_side, max_side)
    bh, bw = assign_bucket(height, width, buckets)
    assert (bh, bw) in buckets
    error = abs(math.log(bh / bw) - math.log(height / width))
    best = min(abs(math.log(h / w) - math.log(height / width)) for h, w in buckets)
    assert error <= best + 1e-12
    ties = [b for b in buckets if abs(abs(math.log(b[0] / b[1]) - math.log(height / width)) - best) < 1e-12]
    assert bh * bw == max(h * w for h, w in ties)  # of equally near buckets the largest
    if height > width:
        assert bh >= bw
    elif width > height:
        assert bw >= bh


def test_bucket_ties_go_to_the_larger_area() -> None:
    assert assign_bucket(50, 50, [(32, 32), (64, 64), (48, 96)]) == (64, 64)
    assert assign_bucket(100, 200, [(32, 64), (64, 128), (64, 64)]) == (64, 128)


def test_dataset_items_have_their_bucket_shape(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    for i, size in enumerate(SOURCE_SIZES):
        Image.new("RGB", size, (i * 30, 90, 160)).save(root / f"{i}.png")
    cfg = DataConfig(train_path=str(root), resolution=64, bucket_step=8, min_bucket_side=32, max_bucket_side=128)
    ds = TrainDataset(build_records(cfg), cfg)
    buckets = make_buckets(64, 8, 32, 128)
    assert len(ds) == len(SOURCE_SIZES)
    for i in range(len(ds)):
        w, h = SOURCE_SIZES[int(ds.records[i].image.stem)]
        assert ds.bucket_of[i] == assign_bucket(h, w, buckets)
        item = ds[i]
        assert item["pixels"].shape == (3, *ds.bucket_of[i]) and item["size"] == ds.bucket_of[i]
        assert torch.allclose(item["pixels"][0].mean(), torch.tensor(int(ds.records[i].image.stem) * 30 / 127.5 - 1))
    square = DataConfig(train_path=str(root), resolution=48, bucket_step=0)
    ds = TrainDataset(build_records(square), square)
    assert {ds[i]["pixels"].shape for i in range(len(ds))} == {(3, 48, 48)}


# --------------------------------------------------------------------------- sampler


GROUPS = {(64, 64): list(range(10)), (32, 128): list(range(10, 17)), (128, 32): list(range(17, 20)), (48, 80): []}
BUCKET_OF = {i: b for b, idx in GROUPS.items() for i in idx}


def test_sampler_batches_are_full_and_from_one_bucket() -> None:
    sampler = BucketBatchSampler(GROUPS, batch_size=3, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1  # incomplete batches dropped
    assert all(len(b) == 3 for b in batches)
    assert all(len({BUCKET_OF[i] for i in b}) == 1 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))  # no index twice in an epoch
    assert Counter(BUCKET_OF[i] for i in seen) == {(64, 64): 9, (32, 128): 6, (128, 32): 3}


def test_sampler_is_seeded_by_seed_and_epoch() -> None:
    def run(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(GROUPS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return [list(b) for b in sampler]

    assert run(3, 0) == run(3, 0) and run(3, 5) == run(3, 5)
    epochs = [run(3, e) for e in range(4)]
    assert all(a != b for n, a in enumerate(epochs) for b in epochs[n + 1 :])
    assert run(3, 0) != run(4, 0)
    for batches in epochs:  # batches of different buckets are interleaved, not one bucket after another
        keys = [BUCKET_OF[b[0]] for b in batches]
        assert keys != sorted(keys)
    ordered = BucketBatchSampler(GROUPS, batch_size=2, seed=3, shuffle=False)
    assert [list(b) for b in ordered][:3] == [[10, 11], [12, 13], [14, 15]]  # unshuffled: sorted buckets, in order


def test_dataset_sampler_groups_by_bucket(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    sizes = [(64, 64)] * 5 + [(128, 64)] * 4 + [(64, 128)] * 3
    for i, size in enumerate(sizes):
        Image.new("RGB", size).save(root / f"{i:02d}.png")
    cfg = DataConfig(train_path=str(root), resolution=64, bucket_step=8, min_bucket_side=32, max_bucket_side=128)
    ds = TrainDataset(build_records(cfg), cfg, seed=11)
    assert len(set(ds.bucket_of)) == 3
    sampler = ds.sampler(2)
    first = [list(b) for b in sampler]
    assert len(first) == 2 + 2 + 1
    for batch in first:
        assert len({ds.bucket_of[i] for i in batch}) == 1
        collated = TrainDataset.collate([ds[i] for i in batch])
        assert collated["pixels"].shape == (2, 3, *ds.bucket_of[batch[0]])
    assert first == [list(b) for b in ds.sampler(2)]
    sampler.set_epoch(1)
    assert [list(b) for b in sampler] != first


# --------------------------------------------------------------------------- deterministic items


def random_aug_cfg(root: Path, **kw) -> DataConfig:
    base = dict(
        train_path=str(root),
        resolution=32,
        bucket_step=0,
        crop="random",
        random_flip=True,
        caption_dropout=0.5,
    )
    return DataConfig(**{**base, **kw})


def augmented_folder(root: Path, n: int = 6) -> Path:
    return image_folder(root, n, size=(48, 72))  # taller than the square bucket, so random crops differ


def item_digest(item: dict) -> tuple[str, str]:
    return item["caption"], hashlib.sha256(item["pixels"].numpy().tobytes()).hexdigest()


def test_items_are_deterministic_for_seed_epoch_and_index(tmp_path: Path) -> None:
    root = augmented_folder(tmp_path / "d")
    cfg = random_aug_cfg(root)
    a, b = TrainDataset(build_records(cfg), cfg, seed=5), TrainDataset(build_records(cfg), cfg, seed=5)
    per_epoch = []
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        forward = [item_digest(a[i]) for i in range(len(a))]
        backward = [item_digest(b[i]) for i in reversed(range(len(b)))][::-1]  # order of access does not matter
        assert forward == backward
        assert forward == [item_digest(a[i]) for i in range(len(a))]  # asking again gives the same
        per_epoch.append(forward)
    assert all(per_epoch[0] != other for other in per_epoch[1:])  # a new epoch is a new draw
    other_seed = TrainDataset(build_records(cfg), cfg, seed=6)
    assert [item_digest(other_seed[i]) for i in range(len(a))] != per_epoch[0]
    # the augmentation really varies: item 0 takes several different cuts over the epochs
    assert len({digests[0][1] for digests in per_epoch}) >= 3


def test_items_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """DataLoader workers and separate runs must draw the same augmentations (no str hashing in the seed)."""
    root = augmented_folder(tmp_path / "d", n=3)
    cfg = random_aug_cfg(root)
    ds = TrainDataset(build_records(cfg), cfg, seed=2)
    here = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        here += [list(item_digest(ds[i])) for i in range(len(ds))]
    script = (
        "import hashlib, json, sys\n"
        "from diffbase.config import DataConfig\n"
        "from diffbase.data.datasets import TrainDataset, build_records\n"
        "cfg = DataConfig(train_path=sys.argv[1], resolution=32, bucket_step=0, crop='random', random_flip=True,"
        " caption_dropout=0.5)\n"
        "ds = TrainDataset(build_records(cfg), cfg, seed=2)\n"
        "out = []\n"
        "for epoch in range(3):\n"
        "    ds.set_epoch(epoch)\n"
        "    for i in range(len(ds)):\n"
        "        it = ds[i]\n"
        "        out.append([it['caption'], hashlib.sha256(it['pixels'].numpy().tobytes()).hexdigest()])\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here


def dropout_dataset(tmp_path: Path, rate: float, n: int = 200) -> TrainDataset:
    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    records = [Record({"image": tmp_path / "a.png"}, f"caption {i}") for i in range(n)]
    cfg = DataConfig(resolution=32, bucket_step=0, caption_dropout=rate)
    return TrainDataset(records, cfg, seed=1)


def test_caption_dropout_rate(tmp_path: Path) -> None:
    ds = dropout_dataset(tmp_path, 0.5)
    captions = [ds.item(i, pixels=False)["caption"] for i in range(len(ds))]
    dropped = sum(c == "" for c in captions)
    assert 0.35 * 200 <= dropped <= 0.65 * 200
    assert all(c in ("", f"caption {i}") for i, c in enumerate(captions))  # kept captions are untouched
    # the choice is per (epoch, item), not fixed per item
    outcomes = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        outcomes.add(ds.item(0, pixels=False)["caption"])
    assert outcomes == {"", "caption 0"}


@pytest.mark.parametrize(("rate", "expected"), [(0.0, 0), (1.0, 200)])
def test_caption_dropout_extremes(tmp_path: Path, rate: float, expected: int) -> None:
    ds = dropout_dataset(tmp_path, rate)
    assert sum(ds.item(i, pixels=False)["caption"] == "" for i in range(len(ds))) == expected


# --------------------------------------------------------------------------- mixing


def test_mixing_whole_repeats_and_a_seeded_fraction(tmp_path: Path) -> None:
    a, b = image_folder(tmp_path / "a", 4), image_folder(tmp_path / "b", 4)
    cfg = DataConfig(
        datasets=[DatasetConfig(str(a), repeats=2), DatasetConfig(str(b), weight=0.5, repeats=3)]
    )  # a: 4 x 2 = 8 items; b: 4 x 3 x 0.5 = 6 items = one whole copy + a seeded half of b
    records = build_records(cfg, seed=0)
    per_ds = Counter(r.dataset for r in records)
    assert per_ds == {0: 8, 1: 6}
    assert all(r.image.parent == (a if r.dataset == 0 else b) for r in records)
    a_counts = Counter(r.image for r in records if r.dataset == 0)
    assert sorted(a_counts.values()) == [2, 2, 2, 2]
    b_counts = Counter(r.image for r in records if r.dataset == 1)
    assert len(b_counts) == 4 and sorted(b_counts.values()) == [1, 1, 2, 2]  # the extra half is 2 distinct images
    assert [(r.image, r.dataset) for r in build_records(cfg, seed=0)] == [(r.image, r.dataset) for r in records]
    subsets = {
        frozenset(
            p for p, c in Counter(r.image for r in build_records(cfg, seed=s) if r.dataset == 1).items() if c == 2
        )
        for s in range(12)
    }
    assert len(subsets) > 1  # the fraction is a seeded draw, not always the first images


def test_mixing_fraction_below_one_and_train_path_first(tmp_path: Path) -> None:
    a, b = image_folder(tmp_path / "a", 3), image_folder(tmp_path / "b", 8)
    cfg = DataConfig(train_path=str(a), datasets=[DatasetConfig(str(b), weight=0.25)])
    records = build_records(cfg, seed=3)
    assert [r.dataset for r in records] == [0, 0, 0, 1, 1]  # train_path is dataset 0; b gives 8 x 0.25 = 2
    assert len({r.image for r in records[3:]}) == 2
    assert [r.caption for r in records[:3]] == [(a / f"{i:03d}.txt").read_text() for i in range(3)]


def test_mixing_errors_name_the_key(tmp_path: Path) -> None:
    a = image_folder(tmp_path / "a", 2)
    with pytest.raises(UserError, match=r"data\.datasets\[1\]\.path: .*nowhere not found"):
        build_records(DataConfig(datasets=[DatasetConfig(str(a)), DatasetConfig(str(tmp_path / "nowhere"))]))
    with pytest.raises(UserError, match=r"data\.datasets\[0\]\.path: repeats must be >= 1"):
        build_records(DataConfig(datasets=[DatasetConfig(str(a), repeats=0)]))
    with pytest.raises(UserError, match="train_path"):
        build_records(DataConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        build_records(DataConfig(train_path=str(tmp_path / "empty")))


# --------------------------------------------------------------------------- bad files


def folder_with_bad_files(root: Path) -> Path:
    image_folder(root, 3)
    rng = np.random.default_rng(0)
    (root / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    good = (root / "000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    root = folder_with_bad_files(tmp_path / "d")
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    ds = TrainDataset(build_records(cfg), cfg)
    assert [r.image.name for r in ds.records] == ["000.png", "001.png", "002.png"]
    assert sorted(p for p, _ in ds.report.files) == [str(root / "corrupt.png"), str(root / "truncated.png")]
    assert all(reason.startswith("not a readable image") for _, reason in ds.report.files)
    summary = ds.report.summary()
    assert summary.startswith("skipped 2 bad file(s)")
    assert str(root / "corrupt.png") in summary and str(root / "truncated.png") in summary
    assert all(ds[i] is not None for i in range(len(ds)))  # what is left loads


@pytest.mark.parametrize("bad", ["corrupt.png", "truncated.png"])
def test_bad_files_fail_when_asked(tmp_path: Path, bad: str) -> None:
    root = folder_with_bad_files(tmp_path / "d")
    (root / ({"corrupt.png", "truncated.png"} - {bad}).pop()).unlink()
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0, on_bad_file="fail")
    with pytest.raises(UserError, match=rf"{bad}: not a readable image .*on_bad_file is 'fail'"):
        TrainDataset(build_records(cfg), cfg)


def test_every_file_bad_is_a_user_error(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    with pytest.raises(UserError, match=r"every image was unusable; skipped 1 bad file\(s\)"):
        TrainDataset(build_records(cfg), cfg)


def truncated_jpeg_folder(root: Path) -> Path:
    """A JPEG whose header is fine but whose data is cut: found only when decoded."""
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "a.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "b.jpg", quality=90)
    data = (root / "b.jpg").read_bytes()
    (root / "b.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(root / "b.jpg") == (64, 64)  # passes the header check
    return root


def test_file_failing_on_decode_is_left_out_of_its_batch(tmp_path: Path) -> None:
    root = truncated_jpeg_folder(tmp_path / "d")
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    ds = TrainDataset(build_records(cfg), cfg)
    assert len(ds) == 2 and not ds.report.files
    items = [ds[0], ds[1]]
    assert items[0] is not None and items[1] is None
    assert [Path(p).name for p, _ in ds.report.files] == ["b.jpg"]
    batch = TrainDataset.collate(items)
    assert batch["index"] == [0] and batch["pixels"].shape == (1, 3, 32, 32)
    strict = DataConfig(train_path=str(root), resolution=32, bucket_step=0, on_bad_file="fail")
    ds = TrainDataset(build_records(strict), strict)
    with pytest.raises(UserError, match=r"b\.jpg: not a readable image"):
        ds[1]


def test_file_failing_on_decode_is_reported_once(tmp_path: Path) -> None:
    root = truncated_jpeg_folder(tmp_path / "d")
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    ds = TrainDataset(build_records(cfg), cfg)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert ds[1] is None
    assert len(ds.report.files) == 1
    assert ds.report.summary().startswith("skipped 1 bad file(s)")


def test_missing_metadata_files_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for name in ("x.png", "y.png"):
        Image.new("RGB", (32, 32)).save(root / name)
    Image.new("L", (32, 32), 255).save(root / "y_m.png")
    write_metadata(
        root,
        [
            {"image": "gone.png", "caption": "a"},
            {"image": "x.png", "caption": "b", "mask": "gone_mask.png"},
            {"image": "y.png", "caption": "c", "mask": "y_m.png"},
        ],
    )
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    ds = TrainDataset(build_records(cfg), cfg)
    assert [r.caption for r in ds.records] == ["c"]
    assert sorted(ds.report.files) == [
        (str(root / "gone.png"), "file not found"),
        (str(root / "gone_mask.png"), "file not found"),
    ]
    assert torch.equal(ds[0]["mask"], torch.ones(1, 32, 32))
    strict = DataConfig(train_path=str(root), resolution=32, bucket_step=0, on_bad_file="fail")
    with pytest.raises(UserError, match=r"gone\.png: file not found"):
        TrainDataset(build_records(strict), strict)


@pytest.mark.parametrize("bad_first", [True, False])
def test_bad_companion_only_drops_its_own_entry(tmp_path: Path, bad_first: bool) -> None:
    root = tmp_path / "m"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "x.png")
    bad = {"image": "x.png", "caption": "bad", "mask": "gone_mask.png"}
    good = {"image": "x.png", "caption": "good"}
    write_metadata(root, [bad, good] if bad_first else [good, bad])
    cfg = DataConfig(train_path=str(root), resolution=32, bucket_step=0)
    ds = TrainDataset(build_records(cfg), cfg)
    assert [r.caption for r in ds.records] == ["good"]
    assert ds.report.files == [(str(root / "gone_mask.png"), "file not found")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{", "not valid JSON"),
        ('{"image": "x.png"}', "expected a list"),
        ('[{"caption": "no image"}]', r"entry 0: expected an object with an 'image' key"),
    ],
)
def test_invalid_metadata_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    root = tmp_path / "m"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "x.png")
    (root / "metadata.json").write_text(text)
    with pytest.raises(UserError, match=message) as info:
        build_records(DataConfig(train_path=str(root)))
    assert str(info.value).startswith(f"{root / 'metadata.json'}:")


@pytest.mark.parametrize(("key", "suggestion"), [("captoin", "caption"), ("contrl", "control"), ("masks", "mask")])
def test_unknown_metadata_key_suggests_the_closest(tmp_path: Path, key: str, suggestion: str) -> None:
    root = tmp_path / "m"
    root.mkdir()
    write_metadata(root, [{"image": "x.png", "caption": "ok"}, {"image": "x.png", key: "x"}])
    with pytest.raises(UserError, match=rf"entry 1: unknown key '{key}' \(did you mean '{suggestion}'\?\)") as info:
        build_records(DataConfig(train_path=str(root)))
    assert str(root / "metadata.json") in str(info.value)
    write_metadata(root, [{"image": "x.png", "zzzz": "x"}])
    with pytest.raises(UserError, match=r"unknown key 'zzzz'$"):  # nothing close: no guess
        build_records(DataConfig(train_path=str(root)))


def test_invalid_jsonl_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "metadata.jsonl"
    file.write_text('{"image": "a.png"}\n{"image": "b.png"}\n{"image": \n')
    with pytest.raises(UserError, match=rf"{file.name}: .*line 3"):
        read_metadata(file)


def test_metadata_jsonl_and_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    file = root / "metadata.jsonl"
    file.write_text('{"image": "sub/a.png", "caption": "one", "mask": "sub/a_m.png"}\n\n{"image": "b.png"}\n')
    records = read_metadata(file, dataset=2)
    assert [(r.image, r.caption, r.mask, r.dataset) for r in records] == [
        (root / "sub" / "a.png", "one", root / "sub" / "a_m.png", 2),
        (root / "b.png", "", None, 2),
    ]


# --------------------------------------------------------------------------- masks and controls


def find_cut(cut: np.ndarray, source: np.ndarray) -> tuple[int, int, bool]:
    """(left, top, flipped) of the window of `source` equal to `cut`, exactly; fails when there is none."""
    ch, cw = cut.shape
    for top in range(source.shape[0] - ch + 1):
        for left in range(source.shape[1] - cw + 1):
            window = source[top : top + ch, left : left + cw]
            for flipped in (False, True):
                if np.array_equal(window[:, ::-1] if flipped else window, cut):
                    return left, top, flipped
    raise AssertionError("the cut is no window of the source")


def test_mask_and_control_get_the_same_crop_and_flip(tmp_path: Path) -> None:
    """No resizing (the image is as wide as the square bucket), so every cut must match exactly."""
    root = tmp_path / "d"
    root.mkdir()
    grey = grey_blocks(48, 80, 8, seed=0)  # (H, W) = (80, 48): random crop picks the top in 0..32 of a 48 bucket
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "a.png")
    Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8), "L").save(root / "a_m.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "a_c.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "a_r.png")
    write_metadata(root, [{"image": "a.png", "mask": "a_m.png", "control": "a_c.png", "reference": "a_r.png"}])
    cfg = DataConfig(train_path=str(root), resolution=48, bucket_step=0, crop="random", random_flip=True)
    ds = TrainDataset(build_records(cfg), cfg, seed=0)
    cuts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["mask"].shape == (1, 48, 48) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        pixels = as_uint8(item["pixels"])[..., 0]
        cuts.add(find_cut(pixels, grey))
        assert torch.equal(item["mask"][0], torch.from_numpy(pixels >= 128).float())
        assert torch.equal(item["control"], item["pixels"]) and torch.equal(item["reference"], item["pixels"])
        batch = TrainDataset.collate([item])
        assert batch["mask"].shape == (1, 1, 48, 48) and batch["control"].shape == (1, 3, 48, 48)
    assert len({top for _, top, _ in cuts}) >= 3 and {flipped for *_, flipped in cuts} == {False, True}


def test_companions_at_another_resolution_stay_aligned(tmp_path: Path) -> None:
    """Image scaled down to the bucket, mask and control stored at other sizes: all cut the same way."""
    root = tmp_path / "d"
    root.mkdir()
    grey = grey_blocks(96, 144, 12, seed=1)  # scaled by 2/3 to cover the 64 square bucket
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "a.png")
    mask_full = np.where(grey >= 128, 255, 0).astype(np.uint8)
    Image.fromarray(mask_full, "L").resize((48, 72), Image.NEAREST).save(root / "a_m.png")  # half size
    Image.fromarray(np.stack([grey] * 3, -1)).resize((192, 288), Image.NEAREST).save(root / "a_c.png")  # double
    write_metadata(root, [{"image": "a.png", "mask": "a_m.png", "control": "a_c.png"}])
    cfg = DataConfig(train_path=str(root), resolution=64, bucket_step=0, crop="random", random_flip=True)
    ds = TrainDataset(build_records(cfg), cfg, seed=4)
    cuts = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["pixels"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
        bright = (item["pixels"][0] > 0).float()
        mask = item["mask"][0]
        agree, agree_mirrored = (bright == mask).float().mean(), (bright.flip(-1) == mask).float().mean()
        assert agree > 0.93, float(agree)
        assert agree_mirrored < 0.8  # the check can tell a mask that is not flipped with its image
        control_bright = (item["control"][0] > 0).float()
        assert (control_bright == bright).float().mean() > 0.97
        cuts.add(hashlib.sha256(item["pixels"].numpy().tobytes()).hexdigest())
    assert len(cuts) >= 3  # the crop and flip really varied


def test_load_mask_is_binary(tmp_path: Path) -> None:
    arr = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(arr, "L").save(tmp_path / "m.png")
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 255))
    rgba.putpixel((3, 0), (0, 0, 0, 0))  # transparent -> white -> counts
    rgba.save(tmp_path / "m2.png")
    assert np.asarray(load_mask(tmp_path / "m.png")).tolist() == [[0, 0, 255, 255]]
    assert np.asarray(load_mask(tmp_path / "m2.png")).tolist() == [[0, 0, 0, 255]]
    with pytest.raises(BadFile, match="file not found"):
        load_mask(tmp_path / "none.png")
