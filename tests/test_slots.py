"""Records with named image slots: paired edits (source -> image) and several references read from
metadata, cut together, batched; a latent cache key per slot; one dataset protocol for plain and
try-on data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffbase.data.cache import build_cache
from diffbase.data.datasets import Record, TrainDataset, read_metadata
from diffbase.methods import get
from diffbase.models import backbone as B
from diffbase.models.loading import load_pipeline
from tests.helpers import tiny_config
from tests.images import image_folder, shape_image


def paired_edits(root: Path, n: int = 3) -> Path:
    """n edits: source -> image, with two references each (the second is the first item's image)."""
    image_folder(root, n, size=(64, 96))
    entries = []
    for i in range(n):
        shape_image(100 + i, (64, 96))[0].save(root / f"src{i}.png")
        shape_image(200 + i, (64, 96))[0].save(root / f"ref{i}.png")
        entries.append({"image": f"{i:03d}.png", "source": f"src{i}.png", "caption": f"edit {i}",
                        "references": [f"ref{i}.png", "000.png"]})  # fmt: skip
    (root / "metadata.json").write_text(json.dumps(entries))
    return root


def test_metadata_slots_are_read_cut_together_and_batched(tmp_path: Path) -> None:
    root = paired_edits(tmp_path / "edits")
    records = read_metadata(root / "metadata.json")
    assert set(records[0].slots) == {"image", "source", "reference", "reference_2"}
    assert records[1].reference_2 == root / "000.png" and records[1].source == root / "src1.png"
    assert records[0].mask is None  # an empty slot reads as None
    with pytest.raises(AttributeError):
        records[0].not_a_slot  # noqa: B018
    config = tiny_config("sd15", tmp_path / "none", root, tmp_path / "run", "data.crop=random", "data.random_flip=true")
    dataset = TrainDataset(records, config.data, seed=0)
    item = dataset[1]
    for slot in ("source", "reference", "reference_2"):
        assert item[slot].shape == item["pixels"].shape  # the same cut, flip included
    batch = dataset.collate([dataset[i] for i in range(3)])
    assert batch["reference_2"].shape[0] == 3 and batch["source"].shape == batch["pixels"].shape
    # reference_2 of item 1 is item 0's image: the same file, the same cut size, the same pixels when unflipped
    unflipped = TrainDataset(records, tiny_config("sd15", tmp_path / "none", root, tmp_path / "r2").data, seed=0)
    torch.testing.assert_close(unflipped[1]["reference_2"], unflipped[0]["pixels"])


def test_a_latent_key_per_slot_and_one_entry_per_file(tiny_model, tmp_path: Path) -> None:
    root = paired_edits(tmp_path / "edits")
    config = tiny_config("sd15", tiny_model("sd15"), root, tmp_path / "run", "data.cache_latents=true")
    pipe, spec = load_pipeline(config.model.pretrained_path)
    bb = B.Backbone(spec, pipe)
    dataset = get("lora").dataset(config, False, None)
    cache, stats = build_cache(config, bb, dataset, show_progress=False, slots=("image", "reference_2", "source"))
    # 3 images + 3 sources; every reference_2 is 000.png, already an image: one latent per file
    assert stats.latents_computed == 6
    assert cache.latent_keys["reference_2"] == [cache.latent_keys["image"][0]] * 3
    batch = dataset.collate([dataset[i] for i in range(3)])
    for slot, pixels in (("source", batch["source"]), ("image", batch["pixels"])):
        mean, std = cache.posterior(batch, slot)
        direct_mean, direct_std = B.encode_distribution(bb, pixels)
        torch.testing.assert_close(mean, direct_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, direct_std, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="slot 'reference' is not cached"):
        cache.posterior(batch, "reference")


def test_try_on_pairs_are_records_too(tmp_path: Path) -> None:
    from diffbase.data.synthetic import write_dataset
    from diffbase.methods.tryon.mechanism.data import TryOnDataset, read_tryon

    write_dataset(tmp_path / "synth", 4, 1, seed=0, size=(32, 32))
    records = read_tryon(tmp_path / "synth", "train")
    assert all(isinstance(r, Record) and {"image", "garment", "mask"} <= set(r.slots) for r in records)
    dataset = TryOnDataset(records, (32, 32))
    for needed in ("records", "report", "sampler", "set_epoch", "collate", "__getitem__", "__len__"):
        assert hasattr(dataset, needed)  # the Dataset protocol TrainDataset also follows
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    assert batch["person"].shape == (4, 3, 32, 32) and batch["garment"].shape == (4, 3, 32, 32)
