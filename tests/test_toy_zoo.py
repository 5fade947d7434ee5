"""The toy model zoo of the embedded default: shipped, small, reproducible, and usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffbase.models.tokenizers import SYNTHETIC_WORDS, clip_tokenizer, t5_tokenizer
from tests.helpers import run_cli

ZOO = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights"


def test_word_level_tokenizers_make_each_caption_word_one_token() -> None:
    clip, t5 = clip_tokenizer(77, SYNTHETIC_WORDS), t5_tokenizer(512, SYNTHETIC_WORDS)
    for word in SYNTHETIC_WORDS:
        assert clip.tokenize(word) == [word + "</w>"]
        assert t5.tokenize(word) == ["▁" + word]
    caption = "a person wearing a polka-dot purple t-shirt"
    assert len(clip.tokenize(caption)) == len(t5.tokenize(caption)) == 11  # words and hyphens
    assert len(clip_tokenizer(77)) == 514 and len(t5_tokenizer(512)) == 256  # tiny models unchanged


@pytest.mark.parametrize("name", ["sd15-toy", "flux1-toy"])
def test_shipped_toys_are_small_and_say_how_they_were_made(name: str) -> None:
    folder = ZOO / name
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["command"].startswith(f"diffbase zoo pretrain {name} OUT")
    total = sum(p.stat().st_size for p in ZOO.rglob("*") if p.is_file())
    assert total < 30 * 2**20


def test_the_flux_toy_generates_people_from_captions(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    code, _, err = run_cli(
        "generate",
        "--model",
        str(ZOO / "flux1-toy"),
        "--prompt",
        "a person wearing a plain red dress",
        "--size",
        "32x32",
        "--steps",
        "12",
        "--out",
        str(out),
    )
    assert code == 0, err
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert img.std() > 10  # a picture, not a flat field


def test_zoo_pretrain_runs_end_to_end(tmp_path: Path) -> None:
    code, out, err = run_cli(
        "zoo", "pretrain", "flux1-toy", str(tmp_path / "toy"), "--vae-steps", "4", "--unet-steps", "4", "--pool", "32"
    )
    assert code == 0, err
    code, _, err = run_cli(
        "generate",
        "--model",
        str(tmp_path / "toy"),
        "--prompt",
        "a person",
        "--size",
        "32x32",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert code == 0, err
