"""The family interface reproduces each diffusers pipeline: same latents from the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffbase.models.backbone import (
    Backbone,
    add_noise,
    decode_latents,
    denoise,
    encode_images,
    encode_prompts,
    image_seq_len,
    model_timesteps,
    pack,
    prediction_kind,
    target,
    unpack,
)
from diffbase.models.loading import load_pipeline
from tests.helpers import FAMILIES

SIZE, STEPS, PROMPT = 64, 3, "a photo of a cat"


def backbone(tiny_model, family: str) -> Backbone:
    pipe, spec = load_pipeline(tiny_model(family))
    return Backbone(spec, pipe)


def scheduler_timesteps(bb: Backbone, latents: torch.Tensor):
    """A fresh scheduler set up as the family's pipeline sets its own."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = bb.pipe.scheduler.__class__.from_config(bb.pipe.scheduler.config)
    if bb.family in ("flux1", "flux2"):
        sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
        seq = image_seq_len(bb, latents.shape[-2:])
        if bb.family == "flux1":
            c = scheduler.config
            mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        else:
            mu = compute_empirical_mu(seq, STEPS)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(STEPS)
    return scheduler


def pipeline_latents(bb: Backbone, guidance: float) -> torch.Tensor:
    out = bb.pipe(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
    ).images
    if bb.family == "flux1":
        return unpack(bb, out, (SIZE // 8, SIZE // 8))
    if bb.spec.pipeline == "Flux2Pipeline":  # packed, still normalised (klein returns raw VAE latents instead)
        return unpack(bb, out, (SIZE // 16, SIZE // 16))
    return out


def our_latents(bb: Backbone, guidance: float) -> torch.Tensor:
    channels = {"flux2": bb.denoiser.config.in_channels}.get(bb.family, bb.vae.config.latent_channels)
    down = 16 if bb.family == "flux2" else 8
    latents = randn_tensor((1, channels, SIZE // down, SIZE // down), generator=torch.Generator("cpu").manual_seed(0))
    if bb.family == "flux1":  # the pipeline draws FLUX.1 noise unpacked, then packs it
        latents = unpack(bb, pack(bb, latents), latents.shape[-2:])
    scheduler = scheduler_timesteps(bb, latents)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    cond = encode_prompts(bb, [PROMPT], image_hw=(SIZE, SIZE))
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        pred = denoise(bb, inp, t.reshape(1), cond, guidance=guidance)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    if bb.spec.pipeline == "Flux2KleinPipeline":  # it returns raw VAE latents for output_type="latent"
        bn = bb.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bb.vae.config.batch_norm_eps)
        latents = bb.pipe._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1))
    return latents


# guidance 1.0 turns CFG off in every pipeline; FLUX dev models get it through their guidance embedding
@pytest.mark.parametrize("family", FAMILIES)
def test_denoising_with_backbone_functions_matches_the_pipeline(family: str, tiny_model) -> None:
    bb = backbone(tiny_model, family)
    guidance = 3.5 if family in ("flux1", "flux2") else 1.0
    with torch.no_grad():
        theirs = pipeline_latents(bb, guidance)
        ours = our_latents(bb, guidance)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_matches_the_pipeline_decoding(family: str, tiny_model) -> None:
    bb = backbone(tiny_model, family)
    channels = {"flux2": bb.denoiser.config.in_channels}.get(bb.family, bb.vae.config.latent_channels)
    down = 16 if bb.family == "flux2" else 8
    latents = torch.randn(1, channels, SIZE // down, SIZE // down, generator=torch.Generator().manual_seed(1))
    ours = (decode_latents(bb, latents) + 1) / 2
    with torch.no_grad():
        if bb.family == "flux2":
            bn = bb.vae.bn
            std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bb.vae.config.batch_norm_eps)
            z = bb.pipe._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1))
        else:
            z = latents / bb.vae.config.scaling_factor + (bb.vae.config.get("shift_factor") or 0.0)
        theirs = bb.pipe.image_processor.postprocess(bb.vae.decode(z, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_shape_and_normalisation(family: str, tiny_model) -> None:
    bb = backbone(tiny_model, family)
    pixels = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    latents = encode_images(bb, pixels, sample=False)
    down, channels = (
        (16, bb.denoiser.config.in_channels) if bb.family == "flux2" else (8, bb.vae.config.latent_channels)
    )
    assert latents.shape == (2, channels, SIZE // down, SIZE // down)
    again = encode_images(bb, pixels, sample=False)
    torch.testing.assert_close(latents, again)  # the mode is deterministic
    assert decode_latents(bb, latents).shape == pixels.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_conditioning_matches_encode_prompt(family: str, tiny_model) -> None:
    bb = backbone(tiny_model, family)
    cond = encode_prompts(bb, ["a cat", "a dog"], image_hw=(SIZE, SIZE))
    assert cond["prompt_embeds"].shape[0] == 2
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    if family == "flux1":
        with torch.no_grad():
            embeds, pooled, _ = bb.pipe.encode_prompt(["a cat", "a dog"], None)
        torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)
        torch.testing.assert_close(cond["prompt_embeds"], embeds)


def test_flow_noise_and_target(tiny_model) -> None:
    bb = backbone(tiny_model, "flux1")
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    assert prediction_kind(bb) == "flow"
    torch.testing.assert_close(add_noise(bb, x0, noise, torch.tensor([0.0, 1.0]))[0], x0[0])
    torch.testing.assert_close(add_noise(bb, x0, noise, torch.tensor([0.0, 1.0]))[1], noise[1])
    torch.testing.assert_close(target(bb, x0, noise, torch.tensor([0.3, 0.7])), noise - x0)
    assert torch.equal(model_timesteps(bb, torch.tensor([0.5])), torch.tensor([500.0]))


def test_ddpm_noise_matches_diffusers_and_v_target(tiny_model) -> None:
    from diffusers import DDPMScheduler

    bb = backbone(tiny_model, "sd15")
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    ddpm = DDPMScheduler.from_config(bb.pipe.scheduler.config)
    torch.testing.assert_close(add_noise(bb, x0, noise, t), ddpm.add_noise(x0, noise, t))
    assert prediction_kind(bb) == "epsilon" and torch.equal(target(bb, x0, noise, t), noise)
    bb.pipe.scheduler.register_to_config(prediction_type="v_prediction")
    torch.testing.assert_close(target(bb, x0, noise, t), ddpm.get_velocity(x0, noise, t))
