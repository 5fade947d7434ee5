"""The latent and text cache: same training numbers as without it, and only what changed is recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from diffbase.data.cache import build_cache
from diffbase.methods import get, train
from diffbase.models.backbone import Backbone
from diffbase.models.loading import load_pipeline
from diffbase.training.loop import encode_batch
from diffbase.training.step import diffusion_step_loss
from tests.helpers import run_cli, tiny_config, write_experiment
from tests.images import image_folder


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux1", "flux2-klein"])
def test_cached_batches_give_the_same_loss_as_computed_ones(family: str, tiny_model, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", 4, size=(64, 96))
    config = tiny_config(
        family,
        tiny_model(family),
        data,
        tmp_path / "run",
        "data.cache_latents=true",
        "data.cache_text=true",
        "training.batch_size=2",
        "data.caption_dropout=0.5",
    )
    pipe, spec = load_pipeline(config.model.pretrained_path)
    bb = Backbone(spec, pipe)
    dataset = get(config.training.method).dataset(config, False, None)
    cache, stats = build_cache(config, bb, dataset, show_progress=False)
    assert stats.latents_computed == 4 and stats.prompts_computed == len({r.caption for r in dataset.records}) + 1
    for indices in dataset.sampler(2):
        batch = dataset.collate([dataset[i] for i in indices])
        direct = encode_batch(bb, batch, None)
        cached = encode_batch(bb, batch, cache)
        assert set(direct[1]) == set(cached[1])
        for key in direct[1]:
            torch.testing.assert_close(cached[1][key], direct[1][key], atol=1e-5, rtol=1e-5)
        losses = [diffusion_step_loss(bb, config.training.objective, e, c, 0, 0).item() for e, c in (direct, cached)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def test_only_what_changed_is_recomputed(tiny_model, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", 4)
    for i in range(4):
        (data / f"{i:03d}.txt").write_text(f"caption number {i}")
    exp = write_experiment(tmp_path / "exp.yaml", "sd15", tiny_model("sd15"), data, tmp_path / "run")

    def cache(*overrides: str) -> str:
        code, out, err = run_cli("cache", str(exp), f"data.cache_dir={tmp_path / 'cache'}", *overrides)
        assert code == 0, err
        return out

    assert "latents: 4 computed, 0 reused; prompts: 4 computed, 0 reused" in cache()
    assert "latents: 0 computed, 4 reused; prompts: 0 computed, 4 reused" in cache()
    img = Image.open(data / "001.png").convert("RGB")
    img.putpixel((3, 3), (1, 2, 3))
    img.save(data / "001.png")
    (data / "002.txt").write_text("a brand new caption")
    assert "latents: 1 computed, 3 reused; prompts: 1 computed, 3 reused" in cache()
    assert "latents: 4 computed, 0 reused; prompts: 0 computed, 4 reused" in cache("data.resolution=128")


def test_a_cached_run_trains_like_an_uncached_one_and_frees_the_encoders(tiny_model, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", 4)
    args = ("training.max_steps=4", "training.batch_size=2", "training.lora.rank=4")
    plain = train(tiny_config("flux1", tiny_model("flux1"), data, tmp_path / "a", *args), show_progress=False)
    cached = train(
        tiny_config(
            "flux1", tiny_model("flux1"), data, tmp_path / "b", *args, "data.cache_latents=true", "data.cache_text=true"
        ),
        show_progress=False,
    )
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    pipe = cached.backbone.pipe
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.vae.encoder is None
    assert list((tmp_path / "b" / "cache" / "latents").glob("shard-*.safetensors"))


def test_random_crops_cannot_be_cached(tiny_model, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", 2)
    exp = write_experiment(tmp_path / "exp.yaml", "sd15", tiny_model("sd15"), data, tmp_path / "run")
    code, _, err = run_cli("train", str(exp), "data.cache_latents=true", "data.crop=random")
    assert code == 2 and err.startswith("error: data.cache_latents:") and err.count("\n") == 1


def test_a_second_process_reuses_every_latent_of_a_random_weight_model(tmp_path: Path) -> None:
    """The VAE's identity does not depend on the process (diffusers keeps a set in its config, ordered
    by the hash seed); and `cache` on a config that does not read the cache says so."""
    import os
    import subprocess
    import sys

    from tests.helpers import SHAPES

    exp = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny" / "sd15_lora.yaml"
    outs = []
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "diffbase.cli", "cache", str(exp), f"data.train_path={SHAPES}",
             f"experiment.output_dir={tmp_path}"],
            env=dict(os.environ, PYTHONHASHSEED=seed), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc)
    assert "latents: 8 computed, 0 reused" in outs[0].stdout
    assert "latents: 0 computed, 8 reused; prompts: 0 computed" in outs[1].stdout
    assert "train` will not read this cache" in outs[1].stderr
