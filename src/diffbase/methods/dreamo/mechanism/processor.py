"""The attention processor DreamO installs on FLUX.1 blocks: diffusers' FluxAttnProcessor computation, plus
the routing and placeholder maps for training (diffbase.methods.dreamo.mechanism.routing) and the cached-reference mode for
generation. Replacing a processor keeps the attention backend the block was set to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from diffbase.methods.dreamo.mechanism.routing import Probes, record


@dataclass
class ReferenceCache:
    """The cached-reference mode: the first step records every block's reference keys and values (the last
    `tokens` of the sequence); later steps run the noisy tokens alone and attend to the recorded ones. Not
    exact: the references' keys and values then keep the first step's timestep."""

    mode: str = "off"  # "record", "read" or "off"
    tokens: int = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class DreamOProcessor(FluxAttnProcessor):
    """FluxAttnProcessor's computation, plus: recording the routing and placeholder maps (`probes`), and
    recording or reading the references' keys and values (`cache`)."""

    def __init__(self, probes: Probes | None = None, cache: ReferenceCache | None = None) -> None:
        super().__init__()
        self.probes, self.cache = probes, cache

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        from diffbase.models.flux_attention import joint_qkv

        q, k, v, text = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if self.probes is not None and self.probes.layout is not None and torch.is_grad_enabled():
            record(self.probes, q, k)  # computed again in a checkpointed recompute, so its saved tensors match
        c = self.cache
        if c is not None and c.mode == "record":
            c.kv[id(self)] = (k[:, -c.tokens :], v[:, -c.tokens :])
        elif c is not None and c.mode == "read":
            ck, cv = c.kv[id(self)]
            k, v = (
                torch.cat([k, ck.expand(k.shape[0], -1, -1, -1)], dim=1),
                torch.cat([v, cv.expand(v.shape[0], -1, -1, -1)], dim=1),
            )
        out = dispatch_attention_fn(
            q, k, v, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text_out.contiguous())


def _keeping_backend(new: DreamOProcessor, old: Any) -> DreamOProcessor:
    new._attention_backend = getattr(old, "_attention_backend", None)
    return new


def install_probes(transformer: torch.nn.Module, blocks: list[str]) -> Probes:
    """DreamOProcessors recording into one Probes on `blocks` (names like `transformer_blocks.0`, `single_transformer_blocks.3`)."""
    from diffbase.errors import UserError

    probes = Probes()
    processors = dict(transformer.attn_processors)
    for block in blocks:
        name = f"{block}.attn.processor"
        if name not in processors:
            raise UserError(f"training.dreamo.probe_blocks: '{block}' is not a block of this transformer")
        processors[name] = _keeping_backend(DreamOProcessor(probes), processors[name])
    transformer.set_attn_processor(processors)
    return probes


@contextlib.contextmanager
def reference_cache(transformer: torch.nn.Module, tokens: int) -> Iterator[ReferenceCache]:
    """DreamOProcessors with one shared cache on every block while the context lasts; the transformer's
    processors are restored afterwards."""
    before = dict(transformer.attn_processors)
    cache = ReferenceCache(tokens=tokens)
    transformer.set_attn_processor(
        {name: _keeping_backend(DreamOProcessor(getattr(p, "probes", None), cache), p) for name, p in before.items()}
    )
    try:
        yield cache
    finally:
        transformer.set_attn_processor(before)
