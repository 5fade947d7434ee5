"""Trigger words and caption shuffling (data.trigger, data.shuffle_captions, data.keep_tags)."""

from __future__ import annotations

import random

import pytest

from diffbase.config import load_config
from diffbase.data.captions import shuffled, with_trigger
from diffbase.errors import UserError
from tests.helpers import SHAPES, TINY_EXPERIMENTS

FLUX_LORA = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")


def test_trigger_replaces_the_placeholder_or_goes_first() -> None:
    assert with_trigger("a photo of [trigger] on a beach", "sks dog") == "a photo of sks dog on a beach"
    assert with_trigger("a dog on a beach", "sks") == "sks, a dog on a beach"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("sks at night", "sks") == "sks at night"
    assert with_trigger("[trigger] x", None) == "[trigger] x"


def test_shuffling_keeps_the_leading_tags_and_every_tag() -> None:
    caption = "sks, red shirt, smiling, outdoors, daylight, close-up"
    orders = {shuffled(caption, 1, random.Random(s)) for s in range(20)}
    assert len(orders) > 1
    for order in orders:
        tags = order.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(caption.split(", "))


def test_a_run_trains_with_both_and_the_dataset_sees_them(tmp_path) -> None:
    import shutil

    from diffbase.data.datasets import TrainDataset, build_records
    from tests.helpers import run_cli

    data = tmp_path / "tags"
    data.mkdir()
    for k in range(4):
        shutil.copy(SHAPES / f"00{k}.png", data / f"{k}.png")
        (data / f"{k}.txt").write_text(f"[trigger], shape {k}, bright colours, flat, centred")
    config = load_config(FLUX_LORA, [f"data.train_path={data}", "data.trigger=zxq", "data.shuffle_captions=true",
                                     "data.keep_tags=1"])  # fmt: skip
    records = build_records(config.data, 0)
    assert all(r.caption.startswith("zxq, shape") for r in records)
    dataset = TrainDataset(records, config.data, 0)
    seen = set()
    for epoch in range(6):
        dataset.epoch = epoch
        caption = dataset.item(0, pixels=False)["caption"]
        assert caption.split(", ")[0] == "zxq"
        seen.add(caption)
    assert len(seen) > 1  # a new order as the epochs go
    code, _, err = run_cli("train", str(FLUX_LORA), "training.max_steps=2", "training.checkpoint_every=0",
                           "training.validation.steps=2", f"data.train_path={data}", "data.trigger=zxq",
                           "data.shuffle_captions=true", "data.keep_tags=1", f"experiment.output_dir={tmp_path / 'r'}")  # fmt: skip
    assert code == 0, err


def test_shuffling_with_cached_text_is_refused() -> None:
    from diffbase.data.datasets import build_records

    config = load_config(FLUX_LORA, [f"data.train_path={SHAPES}", "data.shuffle_captions=true", "data.cache_text=true"])
    with pytest.raises(UserError, match="data.shuffle_captions: each draw has its own tag order"):
        build_records(config.data, 0)
