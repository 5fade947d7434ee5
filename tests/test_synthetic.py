"""The embedded default's synthetic try-on data and the demo's scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffbase.data.synthetic import COLOURS, PATTERNS, combinations, make_item, write_dataset
from diffbase.demo import classify, eval_set, kid_random_features, mean_colour_baseline, score, table
from tests.helpers import run_cli


def pixels(img) -> np.ndarray:
    return np.asarray(img)


def test_items_are_deterministic_from_the_seed() -> None:
    a, b = make_item(3, "train", 5), make_item(3, "train", 5)
    for name in ("person", "garment", "mask", "pose", "keep"):
        assert np.array_equal(pixels(getattr(a, name)), pixels(getattr(b, name)))
    assert a.caption == b.caption
    other = make_item(4, "train", 5)
    assert not np.array_equal(pixels(a.person), pixels(other.person))


def test_the_same_index_dresses_the_same_person_in_any_garment() -> None:
    a = make_item(0, "test", 2, (32, 32))
    b = make_item(0, "test", 2, (32, 32), garment=make_item(0, "test", 9).spec)
    outside = pixels(a.mask) == 0
    assert np.array_equal(pixels(a.person)[outside], pixels(b.person)[outside])  # same person, pose, background
    assert not np.array_equal(pixels(a.person), pixels(b.person))
    assert np.array_equal(pixels(a.mask), pixels(b.mask))  # the mask does not reveal the garment


def test_splits_never_share_a_garment_combination_but_share_every_pattern_and_colour() -> None:
    train, test = set(combinations("train")), set(combinations("test"))
    assert not train & test and len(train) + len(test) == len(PATTERNS) * len(COLOURS)
    assert {p for p, _ in train} == set(PATTERNS) and {c for _, c in train} == set(COLOURS)
    seen = {(make_item(0, "train", i).spec.pattern, make_item(0, "train", i).spec.colour) for i in range(200)}
    held = {(make_item(0, "test", i).spec.pattern, make_item(0, "test", i).spec.colour) for i in range(100)}
    assert seen <= train and held <= test and not seen & held


def test_data_synth_writes_the_layouts_the_methods_read(tmp_path: Path) -> None:
    from diffbase.methods.tryon.mechanism.data import read_tryon

    code, out, err = run_cli("data", "synth", str(tmp_path / "d"), "--n", "8", "--size", "32x32")
    assert code == 0, err
    assert "8 training and 2 held-out" in out
    assert len(read_tryon(tmp_path / "d", "train")) == 8 and len(read_tryon(tmp_path / "d", "test")) == 2
    for folder in ("image", "cloth", "agnostic-mask", "pose", "keep"):
        assert len(list((tmp_path / "d" / "train" / folder).glob("*.png"))) == 8
    again = write_dataset(tmp_path / "e", 8, 2, size=(32, 32))
    assert (again / "train" / "image" / "00003.png").read_bytes() == (
        tmp_path / "d" / "train" / "image" / "00003.png"
    ).read_bytes()


def test_data_commands_refuse_a_size_or_folder_they_cannot_write_in_one_line(tmp_path: Path) -> None:
    # were tracebacks (odd sizes broke the 4x drawing; a file in the way of the folder) with half-written folders
    in_the_way = tmp_path / "file.png"
    in_the_way.write_text("x")
    for argv, expected in (
        (["synth", str(tmp_path / "a"), "--n", "2", "--size", "7x7"], "--size: expected each side at least 8 px"),
        (["synth", str(in_the_way), "--n", "2"], f"out: {in_the_way} is a file; expected a folder"),
        (["synth-edit", str(in_the_way), "--n", "2"], f"out: {in_the_way} is a file"),
        (["synth-dreamo", str(in_the_way), "--n", "2"], f"out: {in_the_way} is a file"),
    ):
        code, _, err = run_cli("data", *argv)
        assert code == 2 and err.startswith("error: " + expected) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]
    code, out, err = run_cli("data", "synth-edit", str(tmp_path / "e"), "--n", "1", "--size", "33x33")
    assert code == 0 and "--size 33x33 is rounded to 32x32" in err, err


def test_demo_scores_a_perfect_result_perfectly_and_baselines_as_by_hand() -> None:
    data = eval_set(6)
    perfect = score(data.truth, data)
    assert perfect == {"masked_l1": 0.0, "colour_acc": 1.0, "pattern_acc": 1.0, "ssim": pytest.approx(1.0),
                       "psnr": pytest.approx(100.0)}  # fmt: skip
    unchanged = score(data.person, data)
    by_hand = np.mean(
        [
            ((p - t).abs() * m).sum().item() / (m.sum().item() * 3)
            for p, t, m in zip(data.person, data.truth, data.mask, strict=True)
        ]
    )
    assert unchanged["masked_l1"] == pytest.approx(by_hand, rel=1e-5)
    # the input person wears another held-out garment: classification finds that one, not the target
    wearing = classify(data.person, data)
    assert all(w != (s.pattern, s.colour) for w, s in zip(wearing, data.specs, strict=True))
    assert unchanged["colour_acc"] + unchanged["pattern_acc"] < 2.0
    mean = mean_colour_baseline(data)
    outside = data.mask.expand_as(mean) == 0
    assert torch.equal(mean[outside], data.person[outside])
    solid = [k for k, s in enumerate(data.specs) if s.pattern == "solid"]
    for k in solid:  # for a plain garment the mean colour is the colour itself
        inside = data.mask[k].expand_as(mean[k]) > 0
        assert (mean[k][inside].view(3, -1).std(1) < 1e-6).all()
    assert "masked L1" in table({"x": perfect}) and "SSIM" in table({"x": perfect})
    kid = kid_random_features(data.person, data)
    assert kid_random_features(data.truth, data) < kid  # the truth against itself is the closest set
    assert "random-weight" in table({"x": perfect | {"kid_random": kid}})
