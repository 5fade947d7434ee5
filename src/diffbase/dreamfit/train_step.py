"""DreamFit training (the official code was never released): every DreamFit LoRA trains, the FLUX.1
base stays frozen, flow matching on the person image, with the write pass inside the same step so
the loss reaches the write-pass LoRAs through the banks. Saved in the official key layout.

A batch is a try-on pair (diffbase.tryon.data): the reference is the garment alone (garment mode),
[pose render | garment] (pose mode) or [keep image | garment] (try-on mode; the keep image is the
person with the garment area blacked out), the target is the person, the caption the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.config import ObjectiveConfig
from diffbase.dreamfit.checkpoint import DOUBLE, NETWORK_ALPHA, SINGLE, Dims, LoraPair, diffusers_name, save_official
from diffbase.dreamfit.generate import GARMENT_TEXT
from diffbase.dreamfit.mechanism import BankState, install
from diffbase.errors import UserError
from diffbase.models import backbone as B
from diffbase.training.objectives import diffusion_loss, sample_flow_sigmas
from diffbase.training.step import sample_generator


class DreamFitLoras(torch.nn.Module):
    """Every DreamFit LoRA as parameters (down random, up zero: training starts at the plain model)."""

    def __init__(self, dims: Dims, rank: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.downs, self.ups = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        self.names: dict[str, str] = {}  # parameter key -> diffusers name
        for kind, count, names in (("double", dims.double, DOUBLE), ("single", dims.single, SINGLE)):
            for i in range(count):
                for name in names:
                    fan_in, fan_out = dims.shapes(kind, name)
                    r = rank * (2 if name == "processor.ref_proj_lora" else 1)
                    key = f"{kind}_blocks.{i}.{name}".replace(".", "__")
                    self.downs[key] = torch.nn.Parameter(torch.randn(r, fan_in, generator=g) / r)
                    self.ups[key] = torch.nn.Parameter(torch.zeros(fan_out, r))
                    self.names[key] = diffusers_name(kind, i, name)

    def pairs(self) -> dict[str, LoraPair]:
        out = {}
        for key, name in self.names.items():
            alpha = NETWORK_ALPHA * (2 if name.endswith("processor.ref_proj_lora") else 1)
            out[name] = LoraPair(self.downs[key], self.ups[key], alpha / self.downs[key].shape[0])
        return out

    def save_official(self, path: Path) -> Path:
        return save_official({k.replace("__", "."): (self.downs[k], self.ups[k]) for k in self.names}, path)


def reference_pixels(batch: dict[str, Any], mode: str) -> torch.Tensor:
    """The write pass's pixels: the garment, [pose | garment] or [keep | garment]."""
    garment = batch["garment"]
    if mode == "garment":
        return garment
    if mode == "pose":
        if "pose" not in batch:
            raise UserError("training.dreamfit.mode: pose needs a 'pose' image for every pair in the metadata")
        return torch.cat([batch["pose"], garment], dim=-1)
    keep = batch["person"] * (1 - batch["person_mask"]) - batch["person_mask"]  # blacked out: -1 in [-1, 1]
    return torch.cat([keep, garment], dim=-1)


def packed(bb: B.Backbone, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = bb.pipe
    n, c, h, w = latents.shape
    ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, bb.device, latents.dtype)
    return pipe._pack_latents(latents, n, c, h, w), ids


def make_dreamfit_loss(objective: ObjectiveConfig, mode: str, state: BankState, prompt: str | None = None) -> Any:
    """The step loss: write pass on the reference, then flow matching on the person (the configured
    timestep sampling and guidance value), reading the banks."""
    guidance = objective.guidance
    cache: dict[str, Any] = {}

    def loss(bb: B.Backbone, batch: dict[str, Any], seed: int, step: int) -> torch.Tensor:
        transformer = bb.forward or bb.denoiser
        gens = [sample_generator(seed, step, i) for i in batch["index"]]
        if "garment_text" not in cache:
            cache["garment_text"] = B.encode_prompts(bb, [GARMENT_TEXT[mode]])
        g_text = cache["garment_text"]
        n = len(gens)
        device = bb.device
        with torch.no_grad():
            ref = B.encode_images(bb, reference_pixels(batch, mode).to(device), sample=False)
            x0 = B.encode_images(bb, batch["person"].to(device), sample=False)
        cond = B.encode_prompts(bb, [prompt] * n if prompt is not None else batch["caption"])
        g = torch.full([n], guidance, device=device) if bb.denoiser.config.guidance_embeds else None
        ref_tokens, ref_ids = packed(bb, ref)
        state.clear()
        state.mode = "write"  # the write pass, with gradients: the banks carry them to the write-pass LoRAs
        try:
            transformer(
                hidden_states=ref_tokens,
                timestep=torch.zeros(n, device=device),
                guidance=g,
                pooled_projections=g_text["pooled_prompt_embeds"].expand(n, -1),
                encoder_hidden_states=g_text["prompt_embeds"].expand(n, -1, -1),
                txt_ids=g_text["text_ids"],
                img_ids=ref_ids[0] if ref_ids.dim() == 3 else ref_ids,
                return_dict=False,
            )
        finally:
            state.mode = "read"
        seq_len = B.image_seq_len(bb, tuple(x0.shape[-2:]))
        config = dict(bb.pipe.scheduler.config)
        sigma = torch.cat([sample_flow_sigmas(objective, 1, config, seq_len, generator=gg) for gg in gens])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=gg) for gg in gens]).to(x0)
        noisy = B.add_noise(bb, x0, noise, sigma)
        pred = B.denoise(bb, noisy, B.model_timesteps(bb, sigma).to(device), cond, guidance=guidance)
        state.clear()
        state.mode = "off"
        return diffusion_loss(pred, B.target(bb, x0, noise, sigma))

    return loss


def prepare(
    bb: B.Backbone, rank: int, mode: str, objective: ObjectiveConfig, seed: int, prompt: str | None = None
) -> tuple[DreamFitLoras, Any]:
    """Install trainable DreamFit LoRAs on the (frozen) transformer; returns them and the loss."""
    loras = DreamFitLoras(Dims.of(bb.denoiser), rank, seed)
    state = install(bb.denoiser, loras.pairs())
    loras.state = state
    return loras, make_dreamfit_loss(objective, mode, state, prompt)
