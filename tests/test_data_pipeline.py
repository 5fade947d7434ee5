"""Training data: image modes, aspect-ratio buckets, deterministic items, mixing, bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbase.config import DataConfig, DatasetConfig
from diffbase.data.buckets import assign_bucket, make_buckets
from diffbase.data.datasets import TrainDataset, build_records
from diffbase.data.images import load_image
from diffbase.errors import UserError
from tests.images import image_folder


def test_image_modes_load_as_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    loaded = np.asarray(load_image(tmp_path / "rgba.png"))
    assert tuple(loaded[0, 0]) == (255, 255, 255) and tuple(loaded[1, 1]) == (0, 0, 255)  # composited on white
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    assert tuple(np.asarray(load_image(tmp_path / "grey.png"))[3, 3]) == (128, 128, 128)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert tuple(np.asarray(load_image(tmp_path / "deep.png"))[2, 2]) == (255, 255, 255)
    wide = Image.new("RGB", (20, 10), "white")
    wide.putpixel((0, 0), (255, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    wide.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (10, 20)


@pytest.mark.parametrize(("height", "width"), [(64, 128), (128, 64), (96, 64), (100, 300), (512, 512), (900, 400)])
def test_buckets_keep_the_aspect_ratio(height: int, width: int) -> None:
    buckets = make_buckets(512, 64, 256, 1024)
    bh, bw = assign_bucket(height, width, buckets)
    assert bh % 64 == 0 and bw % 64 == 0 and min(bh, bw) >= 256 and max(bh, bw) <= 1024 and bh * bw <= 512 * 512
    error = abs(math.log(bh / bw) - math.log(height / width))
    assert all(error <= abs(math.log(h / w) - math.log(height / width)) + 1e-12 for h, w in buckets)
    assert bh * bw >= 0.75 * 512 * 512


def mixed_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 64), (64, 64), (128, 64), (128, 64), (64, 128), (64, 128), (64, 64), (128, 64)]):
        Image.new("RGB", (w, h), (i * 20, 100, 200)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def test_batches_come_from_one_bucket_and_items_are_deterministic(tmp_path: Path) -> None:
    cfg = DataConfig(train_path=str(mixed_folder(tmp_path / "d")), resolution=64, bucket_step=32, min_bucket_side=32,
                     max_bucket_side=128, crop="random", random_flip=True, caption_dropout=0.5)
    ds = TrainDataset(build_records(cfg), cfg, seed=1)
    sampler = ds.sampler(2)
    for batch in sampler:
        assert len({ds.bucket_of[i] for i in batch}) == 1
    first = [list(b) for b in sampler]
    assert first == [list(b) for b in ds.sampler(2)]  # same seed and epoch: same batches
    sampler.set_epoch(1)
    assert [list(b) for b in sampler] != first
    a, b = ds[3], ds[3]
    assert a["caption"] == b["caption"] and (a["pixels"] == b["pixels"]).all()
    dropped = 0
    for epoch in range(25):
        ds.set_epoch(epoch)
        dropped += sum(ds[i]["caption"] == "" for i in range(len(ds)))
    assert 0.35 < dropped / (25 * len(ds)) < 0.65


def test_mixing_counts_whole_repeats_and_a_seeded_fraction(tmp_path: Path) -> None:
    a, b = image_folder(tmp_path / "a", 4), image_folder(tmp_path / "b", 10)
    cfg = DataConfig(datasets=[DatasetConfig(str(a), repeats=3), DatasetConfig(str(b), weight=0.5)])
    records = build_records(cfg, seed=0)
    assert sum(r.dataset == 0 for r in records) == 12 and sum(r.dataset == 1 for r in records) == 5
    assert [r.image for r in build_records(cfg, seed=0)] == [r.image for r in records]


def test_bad_files_are_skipped_and_reported_or_fail(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", 3)
    (root / "broken.png").write_bytes(b"not an image at all")
    good = (root / "000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    cfg = DataConfig(train_path=str(root), resolution=64)
    ds = TrainDataset(build_records(cfg), cfg)
    assert len(ds) == 3 and len(ds.report.files) == 2
    assert {Path(p).name for p, _ in ds.report.files} == {"broken.png", "truncated.png"}
    assert "skipped 2 bad file(s)" in ds.report.summary()
    strict = DataConfig(train_path=str(root), resolution=64, on_bad_file="fail")
    with pytest.raises(UserError, match=r"broken.png: .*on_bad_file is 'fail'"):
        TrainDataset(build_records(strict), strict)
    meta = tmp_path / "m"
    meta.mkdir()
    (meta / "metadata.json").write_text(json.dumps([{"image": "gone.png", "caption": "x"}, {"image": "x.png"}]))
    Image.new("RGB", (64, 64)).save(meta / "x.png")
    cfg = DataConfig(train_path=str(meta), resolution=64)
    ds = TrainDataset(build_records(cfg), cfg)
    assert len(ds) == 1 and "file not found" in ds.report.summary()
    (meta / "metadata.json").write_text(json.dumps([{"image": "x.png", "captoin": "x"}]))
    with pytest.raises(UserError, match="unknown key 'captoin'.*caption"):
        build_records(cfg)
    (meta / "metadata.json").write_text("[{")
    with pytest.raises(UserError, match="metadata.json: not valid JSON"):
        build_records(cfg)


def test_masks_and_controls_are_cut_like_their_image(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    img = Image.new("RGB", (96, 64), "black")
    img.paste((255, 255, 255), (10, 5, 40, 50))
    img.save(root / "a.png")
    img.convert("L").save(root / "a_m.png")
    img.save(root / "a_c.png")
    (root / "metadata.json").write_text(json.dumps([{"image": "a.png", "caption": "", "mask": "a_m.png",
                                                     "control": "a_c.png"}]))
    cfg = DataConfig(train_path=str(root), resolution=48, bucket_step=16, min_bucket_side=16, max_bucket_side=96,
                     crop="random", random_flip=True)
    ds = TrainDataset(build_records(cfg), cfg, seed=3)
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        bright = (item["pixels"].mean(0) > 0).float()
        assert (bright == (item["mask"][0] > 0.5).float()).float().mean() > 0.97
        assert (item["control"] - item["pixels"]).abs().max() < 1e-6
