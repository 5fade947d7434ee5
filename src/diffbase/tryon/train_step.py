"""The try-on training loss: DDPM on the person-over-garment canvas, only `attn1` trains.

Per sample, one generator seeded by (seed, step, index) draws the latent samples, the garment
dropout (which trains the unconditional branch CFG uses), the timestep and the noise, so resume
and multi-process runs stay exact, as for every other method.
"""

from __future__ import annotations

from typing import Any

import torch

from diffbase.config import VtonConfig
from diffbase.models import backbone as B
from diffbase.training.objectives import diffusion_loss, sample_ddpm_timesteps
from diffbase.training.step import sample_generator
from diffbase.tryon import canvas as C


def canvas_batch(bb: B.Backbone, batch: dict[str, Any], generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """Latent canvases of a batch: target (person over garment), masked (condition) and mask."""
    device = bb.device
    person, garment = batch["person"].to(device), batch["garment"].to(device)
    mask = batch["person_mask"].to(device)
    z_person = C.sample_latents(bb, person, generators)
    z_masked = C.sample_latents(bb, C.masked_person(person, mask), generators)
    z_garment = C.sample_latents(bb, garment, generators)
    return {
        "target": C.stack(z_person, z_garment),
        "masked": z_masked,
        "garment": z_garment,
        "masks": C.mask_canvas(mask, tuple(z_person.shape[-2:])),
    }


def make_vton_loss(cfg: VtonConfig) -> Any:
    text_cache: dict[str, torch.Tensor] = {}

    def loss(bb: B.Backbone, batch: dict[str, Any], seed: int, step: int) -> torch.Tensor:
        unet = bb.forward or bb.denoiser
        gens = [sample_generator(seed, step, i) for i in batch["index"]]
        c = canvas_batch(bb, batch, gens)
        keep = torch.tensor([float(torch.rand((), generator=g) >= cfg.garment_dropout) for g in gens])
        cond = C.stack(c["masked"], c["garment"] * keep.view(-1, 1, 1, 1).to(c["garment"]))
        steps = bb.pipe.scheduler.config.num_train_timesteps
        t = torch.cat([sample_ddpm_timesteps(1, steps, generator=g) for g in gens]).to(bb.device)
        noise = torch.stack([torch.randn(c["target"].shape[1:], generator=g) for g in gens]).to(c["target"])
        noisy = B.add_noise(bb, c["target"], noise, t)
        text = None
        if cfg.variant == "vton":
            if cfg.prompt not in text_cache:
                text_cache[cfg.prompt] = B.encode_prompts(bb, [cfg.prompt])["prompt_embeds"]
            text = text_cache[cfg.prompt].expand(len(gens), -1, -1)
        pred = unet(
            C.unet_input(cfg.variant, noisy, c["masks"], cond), t, encoder_hidden_states=text, return_dict=False
        )[0]
        return diffusion_loss(pred, B.target(bb, c["target"], noise, t))

    return loss
