"""What the FLUX families share: latents as tokens with position ids, references appended after the noisy
tokens, and the transformer call as FluxPipeline / Flux2Pipeline build it."""

from __future__ import annotations

from typing import Any

import torch

JOINT = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_MARKERS = ("double_blocks", "single_blocks", "transformer.transformer_blocks",
                "transformer.single_transformer_blocks", "lora_unet_double_blocks", "lora_unet_single_blocks",
                "transformer_blocks.", "single_transformer_blocks.")  # fmt: skip


def guidance_input(model: Any, latents: torch.Tensor, guidance: float | None) -> torch.Tensor | None:
    """The guidance embedding's input of a guidance-distilled transformer (1.0 unless given)."""
    if not model.config.guidance_embeds:
        return None
    return torch.full([latents.shape[0]], 1.0 if guidance is None else guidance, device=latents.device,
                      dtype=torch.float32)  # fmt: skip


def denoise(bb: Any, call: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
            guidance: float | None, c: Any, extra: dict[str, Any], layout: Any = None,
            pooled: bool = False) -> torch.Tensor:  # fmt: skip
    t = timesteps.to(latents.dtype).expand(latents.shape[0])
    tokens, ids = layout.pack(bb, latents), layout.image_ids(bb, latents)
    count = tokens.shape[1]
    if c.channels is not None:  # Fill: [noisy | masked latent | mask] per token
        tokens = torch.cat([tokens, layout.pack(bb, c.channels.to(latents))], dim=-1)
    if c.tokens is not None:  # references after the noisy tokens, with their own ids
        tokens = torch.cat([tokens, c.tokens.to(latents)], dim=1)
        ids = torch.cat([ids, c.token_ids.to(ids)], dim=-2)
    kwargs = {
        "hidden_states": tokens,
        "timestep": t / 1000,
        "guidance": guidance_input(bb.denoiser, latents, guidance),
        "encoder_hidden_states": cond["prompt_embeds"],
        "txt_ids": cond["text_ids"],
        "img_ids": ids,
        "return_dict": False,
    }
    if pooled:
        kwargs["pooled_projections"] = cond["pooled_prompt_embeds"]
    out = call(**kwargs, **extra)[0][:, :count]
    return layout.unpack(bb, out, latents.shape[-2:])
