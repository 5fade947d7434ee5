"""Kontext and Fill training on paired edits (recoloured garments), on tiny FLUX models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffbase.errors import UserError


def edit_config(tiny_model, tmp_path: Path, family: str, method: str, *extra: str):
    from diffbase.config import configs_dir, load_config
    from diffbase.data.synthetic import write_edit_pairs

    data = write_edit_pairs(tmp_path / "pairs", 8, size=(32, 32))
    model = {
        "flux1-kontext": "flux1_tiny.yaml",
        "flux1-fill": "flux1_tiny.yaml",
        "flux2-klein": "flux2_klein_tiny.yaml",
    }
    return load_config(
        configs_dir() / "models" / model[family],
        [
            f"model.pretrained_path={tiny_model(family)}",
            f"data.train_path={data / 'metadata.jsonl'}",
            "data.resolution=32",
            "data.bucket_step=0",
            f"training.method={method}",
            "training.max_steps=16",
            "training.batch_size=2",
            "training.learning_rate=5e-3",
            "training.lora.rank=4",
            "training.lora.alpha=4",
            "training.checkpoint_every=0",
            "training.validation.loss_split=0.25",
            "training.validation.steps=2",
            f"experiment.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.parametrize(("family", "method"), [("flux1-kontext", "kontext"), ("flux1-fill", "fill")])
def test_training_learns_exports_and_validates(tiny_model, tmp_path, family, method) -> None:
    from diffbase.methods import get, train
    from diffbase.training.loop import read_batch

    config = edit_config(tiny_model, tmp_path, family, method, "training.max_steps=30", "training.learning_rate=2e-2")
    result = train(config, show_progress=False)
    assert result.finished and all(torch.isfinite(torch.tensor(result.losses)))
    bb, m = result.backbone, get(method)
    batch = read_batch(m.dataset(config, False, bb), [0, 1, 2, 3])

    def fixed_noise_loss() -> float:  # the same noise and timesteps each time (steps 1000..1007)
        with torch.no_grad():
            return sum(float(m.loss(config, bb, result.trained, batch, None, s)[0]) for s in range(1000, 1008))

    trained = fixed_noise_loss()
    bb.denoiser.disable_adapters()  # the LoRA starts at zero: this is the model before training
    before = fixed_noise_loss()
    bb.denoiser.enable_adapters()
    assert trained < 0.9 * before, (trained, before)
    for name in ("lora/pytorch_lora_weights.safetensors", "lora/lora_kohya.safetensors"):
        assert (tmp_path / "run" / name).is_file()
    assert list((tmp_path / "run" / "validation").glob("*.png"))  # source | result | target


def test_the_source_reaches_the_loss_and_the_cache_changes_nothing(tiny_model, tmp_path) -> None:
    from diffbase.methods import get
    from diffbase.training.loop import read_batch
    from diffbase.training.train import load_backbone, prepare_cache

    config = edit_config(tiny_model, tmp_path, "flux2-klein", "kontext", "training.validation.loss_split=0")
    method = get("kontext")
    bb = load_backbone(config)
    trained = method.prepare(bb, config)
    dataset = method.dataset(config, False, bb)
    batch = read_batch(dataset, [0, 1])
    with torch.no_grad():
        plain, _ = method.loss(config, bb, trained, batch, None, 5)
        swapped, _ = method.loss(config, bb, trained, dict(batch, source=batch["source"].flip(0)), None, 5)
        assert not torch.equal(plain, swapped)  # (the tiny random klein attends to it only weakly)
        config.data.cache_latents = config.data.cache_text = True
        cache = prepare_cache(config, bb, [dataset], show_progress=False, method=method)[0]
        cached, _ = method.loss(config, bb, trained, read_batch(dataset, [0, 1]), cache, 5)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


def test_wrong_folders_and_settings_are_one_line_errors(tiny_model, tmp_path) -> None:
    from diffbase.methods import get
    from diffbase.training.train import load_backbone

    for family, method, extra, expected in (
        ("flux1-fill", "kontext", (), "kontext trains"),
        (
            "flux1-kontext",
            "fill",
            (),
            "fill trains a .*FluxFillPipeline.* folder; model.pretrained_path holds a FluxKontext",
        ),
        ("flux1-fill", "fill", ("data.cache_latents=true",), "data.cache_latents: fill"),
    ):
        config = edit_config(tiny_model, tmp_path / method / family, family, method, *extra)
        with pytest.raises(UserError, match=expected):
            get(method).prepare(load_backbone(config), config)


@pytest.mark.parametrize("cached", [False, True])
def test_sources_of_another_shape_keep_it_and_train(tiny_model, tmp_path, cached: bool) -> None:
    """Sources twice as tall as their targets get buckets of their own (a source of the target's size keeps
    the target's cut); batches, the latent cache and validation through the pipeline all take them."""
    import json

    from PIL import Image

    from diffbase.methods import get, train
    from diffbase.methods.edit.method import _dataset
    from diffbase.training.train import load_backbone

    extra = ("data.bucket_step=16", "data.min_bucket_side=16", "data.max_bucket_side=96", "training.max_steps=2",
             f"data.cache_latents={str(cached).lower()}")  # fmt: skip
    config = edit_config(tiny_model, tmp_path, "flux1-kontext", "kontext", *extra)
    pairs = tmp_path / "pairs"
    entries = [json.loads(x) for x in (pairs / "metadata.jsonl").read_text().splitlines()]
    for e in entries[::2]:  # half the sources become 32x64 (width x height)
        source = pairs / e["source"]
        Image.open(source).resize((32, 64)).save(source)
    bb = load_backbone(config)
    data = _dataset(config, False, bb)
    shapes = {(tuple(data[i]["pixels"].shape), tuple(data[i]["source"].shape)) for i in range(len(data))}
    assert ((3, 32, 32), (3, 32, 32)) in shapes and any(s[-2] > s[-1] for _, s in shapes), shapes  # portrait kept
    for batch in data.sampler(2):
        assert len({tuple(data[i]["source"].shape) for i in batch}) == 1  # a batch shares its sources' bucket
    result = train(config, show_progress=False)
    assert result.finished and (tmp_path / "run" / "validation" / "step-000002.png").exists()
    assert get("kontext").name == "kontext"
