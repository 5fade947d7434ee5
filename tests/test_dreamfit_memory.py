"""DreamFit training memory: the cache (same loss, encoders freed), checkpointing of both passes (same
gradients, fewer saved activations) and banks in the compute dtype."""

from __future__ import annotations

import pytest
import torch

from diffbase.training.memory import SavedBytes
from tests.helpers import dreamfit_config


def set_up(config):
    from diffbase.methods import get
    from diffbase.training.train import load_backbone

    method = get("dreamfit")
    bb = load_backbone(config)
    trained = method.prepare(bb, config)
    for p in trained.trainable:  # the LoRAs' up halves start at zero: give every path a gradient
        torch.nn.init.normal_(p, std=0.02)
    dataset = method.dataset(config, False, bb)
    return method, bb, trained, dataset


def loss_and_grads(method, config, bb, trained, batch, cache=None):
    for p in trained.trainable:
        p.grad = None
    loss, _ = method.loss(config, bb, trained, batch, cache, 3)
    loss.backward()
    return loss.detach(), grads(trained)


def grads(trained) -> list[torch.Tensor]:
    """Every LoRA's gradient (zeros for the few whose write-pass output feeds nothing)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trained.trainable]


def test_cached_loss_equals_uncached_and_the_encoders_are_freed(tiny_model, tmp_path) -> None:
    from diffbase.training.train import prepare_cache

    config = dreamfit_config(tiny_model, tmp_path, "training.dreamfit.mode=tryon")
    method, bb, trained, dataset = set_up(config)
    batch = dataset.collate([dataset[0], dataset[1]])
    plain, plain_grads = loss_and_grads(method, config, bb, trained, batch)

    config.data.cache_latents = config.data.cache_text = True
    cache = prepare_cache(config, bb, [dataset], show_progress=False, method=method)[0]
    assert bb.pipe.text_encoder is None and bb.pipe.text_encoder_2 is None and bb.vae.encoder is None
    lean = dataset.collate([dataset[0], dataset[1]])  # the cache holds every latent: no pixels are read
    assert "person" not in lean and lean["index"] == [0, 1]
    cached, cached_grads = loss_and_grads(method, config, bb, trained, lean, cache)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    fresh, _ = set_up(config)[1:3]  # a second run reuses every latent and prompt
    again, stats = method.cache(config, fresh, dataset, False)
    assert again.latent_keys == cache.latent_keys
    assert (stats.latents_computed, stats.prompts_computed) == (0, 0) and stats.latents_reused == len(dataset)


def test_latents_alone_are_cached_without_a_text_cache(tiny_model, tmp_path) -> None:
    config = dreamfit_config(tiny_model, tmp_path, "training.dreamfit.mode=tryon", "data.cache_latents=true")
    method, bb, _, dataset = set_up(config)
    cache, stats = method.cache(config, bb, dataset, False)
    assert cache.text is None and stats.latents_computed == len(dataset) and stats.prompts_computed == 0


@pytest.mark.parametrize("passes", ["[write]", "[write,read]"])
def test_checkpointing_covers_both_passes_with_the_same_gradients(tiny_model, tmp_path, passes) -> None:
    config = dreamfit_config(
        tiny_model, tmp_path, "training.dreamfit.mode=garment", f"training.dreamfit.checkpoint_passes={passes}"
    )
    method, bb, trained, dataset = set_up(config)
    batch = dataset.collate([dataset[0], dataset[1]])
    params = list(bb.denoiser.parameters())
    with SavedBytes(exclude=params) as plain_saved:
        loss, _ = method.loss(config, bb, trained, batch, None, 3)
    loss.backward()
    plain_grads = grads(trained)

    trained.checkpointing()
    for p in trained.trainable:
        p.grad = None
    with SavedBytes(exclude=params) as saved:
        loss2, _ = method.loss(config, bb, trained, batch, None, 3)
    state = trained.extras["banks"]
    assert state.mode == "off" and not state.banks  # the loss leaves nothing behind but the graph
    loss2.backward()
    assert state.mode == "off" and not state.banks and not state.replaying  # the recompute restored the state
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(grads(trained), plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert saved.total < (0.8 if passes == "[write]" else 0.5) * plain_saved.total


def test_banks_are_kept_in_the_compute_dtype(tiny_model) -> None:
    from diffbase.methods.dreamfit.mechanism.checkpoint import Dims
    from diffbase.methods.dreamfit.mechanism.loras import DreamFitLoras
    from diffbase.methods.dreamfit.mechanism.passes import install, write_banks
    from diffbase.models.loading import load_pipeline
    from tests.helpers import transformer_inputs as inputs

    pipe, _ = load_pipeline(tiny_model("flux1"), dtype="bfloat16")
    loras = DreamFitLoras(Dims.of(pipe.transformer), 4, seed=0)  # fp32, as training keeps what trains
    state = install(pipe.transformer, loras.pairs())
    x = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in inputs(pipe.transformer, 0).items()}  # fmt: skip
    write_banks(pipe.transformer, state, **x)
    assert state.banks and {t.dtype for bank in state.banks.values() for t in bank[1:]} == {torch.bfloat16}


def test_memory_breakdown_scales_with_tokens_and_checkpointing_saves() -> None:
    """benchmarks/dreamfit.py's accounting on the meta device: activations grow with the image tokens,
    checkpointing the write pass removes most of its activations and holds the banks apart."""
    from benchmarks.dreamfit import CONFIGS, memory_breakdown, training_total

    toy = CONFIGS / "flux1_toy.yaml"
    small, large = (memory_breakdown(toy, hw, text_tokens=32) for hw in ((32, 32), (128, 128)))
    assert large["activations: read pass"] > 1.8 * small["activations: read pass"]
    assert small["transformer weights"] == large["transformer weights"]
    write = memory_breakdown(toy, (128, 128), text_tokens=32, checkpointing=("write",))
    both = memory_breakdown(toy, (128, 128), text_tokens=32, checkpointing=("write", "read"))
    assert write["activations: write pass"] < 0.2 * large["activations: write pass"]
    assert write["banks held apart from the activations"] == large["banks (all keys and values, for reference)"] > 0
    assert training_total(both) < training_total(write) < training_total(large) < training_total(large, cached=False)
