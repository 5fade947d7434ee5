"""Several resolutions per run (`data.resolution: [64, 96]`): every image is an item once per size, each size
with its own buckets, a batch holds one size, the latent cache keeps each size's cut, and a bad list is a
one-line error at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffbase.config import Config, load_config
from diffbase.data.buckets import largest_resolution, make_buckets, resolutions
from diffbase.data.datasets import TrainDataset, build_records
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli

EXPERIMENT = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
# bucket_step 32: 96 is a multiple, so the square shapes are cut to 64x64 at 64 and to 96x96 at 96
TWO = ("data.resolution=[96, 64]", "data.bucket_step=32")


def config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(EXPERIMENT, [f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path / 'run'}",
                                    "training.checkpoint_every=0", "training.validation.steps=2", *overrides])  # fmt: skip


def dataset(cfg: Config) -> TrainDataset:
    return TrainDataset(build_records(cfg.data, cfg.experiment.seed), cfg.data, cfg.experiment.seed)


def test_the_helpers_read_one_size_or_several(tmp_path: Path) -> None:
    assert resolutions(config(tmp_path).data) == [64] and largest_resolution(config(tmp_path).data) == 64
    several = config(tmp_path, "data.resolution=[96, 64, 96]", "data.bucket_step=32").data
    assert resolutions(several) == [64, 96] and largest_resolution(several) == 96


def test_every_image_is_an_item_at_every_size_in_that_sizes_buckets(tmp_path: Path) -> None:
    one, two = dataset(config(tmp_path, "data.bucket_step=32")), dataset(config(tmp_path, *TWO))
    assert len(two) == 2 * len(one) == 2 * len(build_records(config(tmp_path).data))
    assert sorted(two.resolution_of) == [64] * len(one) + [96] * len(one)
    d = config(tmp_path, *TWO).data
    for i, res in enumerate(two.resolution_of):
        assert two.bucket_of[i] in make_buckets(res, d.bucket_step, d.min_bucket_side, d.max_bucket_side)
        assert 0.5 * res**2 <= two.bucket_of[i][0] * two.bucket_of[i][1] <= res**2
    assert {two.bucket_of[i] for i in range(len(two))} == {(64, 64), (96, 96)}
    for batch in two.sampler(2):  # one bucket, one size per batch; together every item once
        assert len({two.bucket_of[i] for i in batch}) == 1 and len({two.resolution_of[i] for i in batch}) == 1
    assert sorted(i for batch in two.sampler(2) for i in batch) == list(range(len(two)))


def test_a_list_of_one_size_is_that_size(tmp_path: Path) -> None:
    plain, listed = dataset(config(tmp_path)), dataset(config(tmp_path, "data.resolution=[64]"))
    assert plain.records == listed.records and plain.bucket_of == listed.bucket_of
    assert list(plain.sampler(2)) == list(listed.sampler(2))


def test_training_at_two_sizes_batches_one_size_at_a_time(tmp_path: Path, monkeypatch) -> None:
    from diffbase.methods import train

    seen: list[tuple[int, ...]] = []
    collate = TrainDataset.collate

    def recording(items):  # noqa: ANN001, ANN202
        batch = collate(items)
        seen.append(tuple(batch["pixels"].shape))
        return batch

    monkeypatch.setattr(TrainDataset, "collate", staticmethod(recording))
    train(config(tmp_path, *TWO, "training.max_steps=8"), show_progress=False)  # one epoch: 16 items, batches of 2
    assert len(seen) == 8 and all(shape[0] == 2 for shape in seen)
    assert sorted({shape[2:] for shape in seen}) == [(64, 64), (96, 96)]
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_latent_cache_keeps_each_sizes_cut(tmp_path: Path) -> None:
    def cache(*overrides: str) -> str:
        code, out, err = run_cli("cache", str(EXPERIMENT), f"data.train_path={SHAPES}", "data.cache_latents=true",
                                 f"experiment.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.bucket_step=32", *overrides)  # fmt: skip
        assert code == 0, err
        return out

    n = len(build_records(config(tmp_path).data))
    assert f"latents: {2 * n} computed, 0 reused" in cache("data.resolution=[64, 96]")
    assert f"latents: 0 computed, {n} reused" in cache("data.resolution=64")  # the 64 px cut is the same entry
    assert f"latents: 0 computed, {n} reused" in cache("data.resolution=96")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "data.resolution: expected a size or a non-empty list of sizes"),
        ("[64, 0]", "data.resolution: 0 is too small"),
        ("[64, 32]", "data.resolution: 32 is smaller than data.bucket_step (64)"),
        ("[64, big]", "data.resolution: expected an integer or a list"),
    ],
)
def test_a_bad_resolution_is_one_line_exit_2(tmp_path: Path, value: str, message: str) -> None:
    code, _, err = run_cli("train", str(EXPERIMENT), f"data.train_path={SHAPES}", f"data.resolution={value}",
                           f"experiment.output_dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # stopped at load, before the model
