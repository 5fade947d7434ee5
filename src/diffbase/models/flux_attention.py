"""The first half of diffusers' FluxAttnProcessor for processors that need more than it does (DreamFit's
banks, DreamO's maps and reference cache): queries, keys and values over [text, image], after the QK
norms and RoPE, as the stock processor computes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def joint_qkv(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb: Any,
    delta: Callable[[str, torch.Tensor], torch.Tensor | int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q, k, v) of shape (B, tokens, heads, head_dim) and the text length. `delta(name, x)` adds to the image
    stream's q, k or v projection (a LoRA); the text stream's projections are the stock ones."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, attn.head_dim))

    x = hidden_states
    q, k, v = (heads(proj(x) + (delta(name, x) if delta else 0))
               for name, proj in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)))  # fmt: skip
    q, k = attn.norm_q(q), attn.norm_k(k)
    text = 0
    if encoder_hidden_states is not None:
        e = encoder_hidden_states
        eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        text = e.shape[1]
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q, k, v, text
