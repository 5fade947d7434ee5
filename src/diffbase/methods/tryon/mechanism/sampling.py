"""Try-on inference for both variants, run as CatVTON runs: DDIM ("leading" spacing, steps_offset 1,
no clipping, final alpha = alphas_cumprod[0]) with eta, classifier-free guidance whose
unconditional branch zeroes the garment latent (batch order [uncond, cond], same mask and noise),
the result decoded from the person half of the latent canvas only (CatVTON splits the latents before
the VAE: decoding the whole canvas lets the decoder's attention and convolutions mix the garment half
into the person), and optionally the unmasked pixels pasted back.

Seeds: by default one CPU generator seeded with `seed` draws everything (VAE samples, initial noise,
DDIM's eta noise). `seed_mode="catvton"` draws the VAE samples from the global generator seeded with
`seed`, masked person first, then garment, as CatVTON's scripts do, so its numbers can be reproduced."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffbase import progress
from diffbase.methods.tryon.mechanism import canvas as C
from diffbase.models import backbone as B


@dataclass
class TryOnSettings:
    steps: int = 50
    guidance: float = 2.5
    eta: float = 1.0
    seed: int = 0
    prompt: str = ""  # vton variant only (CatVTON has no text)
    repaint: bool = True  # paste the person's unmasked pixels back onto the result
    seed_mode: str = "diffbase"  # or "catvton": VAE samples from the global generator, as CatVTON's scripts


def ddim(bb: B.Backbone) -> object:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        bb.pipe.scheduler.config,
        timestep_spacing="leading",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=B.prediction_kind(bb),
    )


def text_condition(bb: B.Backbone, variant: str, prompt: str, batch: int) -> torch.Tensor | None:
    if variant == "catvton":
        return None
    return B.encode_prompts(bb, [prompt] * batch)["prompt_embeds"]


@torch.no_grad()
def tryon(
    bb: B.Backbone,
    variant: str,
    person: torch.Tensor,
    garment: torch.Tensor,
    mask: torch.Tensor,
    settings: TryOnSettings,
) -> torch.Tensor:
    """person, garment (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1} -> result (B, 3, H, W)."""
    unet, device = bb.denoiser, bb.device
    g = torch.Generator("cpu").manual_seed(settings.seed)
    n = person.shape[0]
    person, garment, mask = person.to(device), garment.to(device), mask.to(device)
    if settings.seed_mode == "catvton":
        torch.manual_seed(settings.seed)
    vae_gens = [None] * n if settings.seed_mode == "catvton" else [g] * n
    z_masked = C.sample_latents(bb, C.masked_person(person, mask), vae_gens)  # masked person first, then garment
    z_garment = C.sample_latents(bb, garment, vae_gens)
    cond = C.stack(z_masked, z_garment)
    uncond = C.stack(z_masked, torch.zeros_like(z_garment))
    masks = C.mask_canvas(mask, tuple(z_masked.shape[-2:]))
    text = text_condition(bb, variant, settings.prompt, n)
    use_cfg = settings.guidance > 1.0
    scheduler = ddim(bb)
    scheduler.set_timesteps(settings.steps, device=device)
    latents = torch.randn(cond.shape, generator=g).to(device) * scheduler.init_noise_sigma
    for t in progress.bar(scheduler.timesteps, "try-on"):
        if use_cfg:
            x = C.unet_input(variant, torch.cat([latents] * 2), torch.cat([masks] * 2), torch.cat([uncond, cond]))
            enc = torch.cat([text] * 2) if text is not None else None
        else:
            x, enc = C.unet_input(variant, latents, masks, cond), text
        pred = unet(x.to(unet.dtype), t, encoder_hidden_states=enc, return_dict=False)[0]
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + settings.guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, eta=settings.eta, generator=g, return_dict=False)[0]
    result = B.decode_latents(bb, C.top_half(latents))  # the person half only, as CatVTON decodes
    if settings.repaint:
        result = person * (1 - mask) + result * mask
    return result
