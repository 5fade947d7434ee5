"""DreamFit's write and read passes on diffusers' FluxTransformer2DModel (facts: docs/DREAMFIT.md).

- Write pass (once per generation, timestep 0, clean garment latent, the mode's garment text): the
  DreamFit LoRAs are active (q/k/v and output LoRAs in the attention processors; modulation and MLP
  LoRAs as forward hooks) and every block with DreamFit weights stores its keys and values: the image
  stream for double blocks, the whole [garment text, garment image] sequence for single blocks. Blocks
  without weights keep their own processor: plain FLUX in every mode, as in the official code. Keys
  are stored after QK-norm and RoPE with the garment's own ids; the text ids are zeros and the garment
  grid starts at (0, 0), so this equals applying RoPE with the reference ids at read time.
- Read pass (every step): the plain FLUX path, no LoRA, with the banks appended to the keys and
  values. The bank's queries are not computed: with no attention mask only the appended keys and
  values can change the kept outputs, so dropping them is exact and cheaper (`keep_bank_queries`
  computes them anyway, for the check).

Gradient checkpointing (`bank_checkpointing`) covers both passes: the recompute in the backward pass
sees the mode and banks of the original call and does not store the banks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from diffbase.methods.dreamfit.mechanism.checkpoint import LoraPair, covered_blocks


@dataclass
class BankState:
    mode: str = "off"  # "off" (plain FLUX), "write" or "read"
    banks: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (q or None), k, v
    writes: int = 0  # block writes so far (a generation writes each block once)
    write_passes: int = 0
    keep_bank_queries: bool = False
    negative: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # true CFG's banks
    reading_negative: bool = False  # the current transformer call is true CFG's negative branch
    replaying: bool = False  # gradient checkpointing's recompute: compute as before, store nothing

    def clear(self) -> None:
        self.banks.clear()
        self.negative.clear()
        self.reading_negative = False

    def bank_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for bank in self.banks.values() for t in bank if t is not None)


class DreamFitProcessor:
    """Attention for one FLUX block in any of the three modes."""

    def __init__(self, name: str, double: bool, pairs: dict[str, LoraPair], state: BankState) -> None:
        self.name, self.double, self.pairs, self.state = name, double, pairs, state

    def _lora(self, key: str, x: torch.Tensor) -> torch.Tensor | int:
        pair = self.pairs.get(f"{self.name}.processor.{key}")
        return pair.delta(x) if pair is not None and self.state.mode == "write" else 0

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

        q, k, v, text_len = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                      lambda name, x: self._lora(f"ref_qkv_lora_{name}", x))  # fmt: skip
        seq = q.shape[1]
        if self.state.mode == "write" and not self.state.replaying:
            start = text_len if self.double else 0  # double blocks keep the image stream only
            dtype = attn.to_k.weight.dtype  # the compute dtype: fp32 LoRA deltas must not widen the banks
            bank_q = q[:, start:].to(dtype) if self.state.keep_bank_queries else None  # only the check needs them
            target = self.state.negative if self.state.reading_negative else self.state.banks
            target[self.name] = (bank_q, k[:, start:].to(dtype), v[:, start:].to(dtype))
            self.state.writes += 1
        elif self.state.mode == "read" and self.name in self.state.banks:
            banks = self.state.negative if self.state.reading_negative and self.state.negative else self.state.banks
            bq, bk, bv = banks[self.name]
            n = q.shape[0]
            k = torch.cat([k, bk.expand(n, -1, -1, -1)], dim=1)
            v = torch.cat([v, bv.expand(n, -1, -1, -1)], dim=1)
            if self.state.keep_bank_queries:
                q = torch.cat([q, bq.expand(n, -1, -1, -1)], dim=1)
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask)[:, :seq]
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([text_len, seq - text_len], dim=1)
        image = attn.to_out[0](image.contiguous()) + self._lora("ref_proj_lora1", image)
        return attn.to_out[1](image), attn.to_add_out(text.contiguous())


def _hook(pair: LoraPair, state: BankState) -> Any:
    """Adds the LoRA of the module's input to its output, in the write pass only."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + pair.delta(args[0]) if state.mode == "write" else output

    return hook


# Where the non-attention LoRAs act: (diffusers module inside the block, LoRA name). The text stream's
# txt_mod.lin_lora is in the checkpoints but never changes the official output, so it is not applied.
DOUBLE_HOOKS = (
    ("norm1.linear", "img_mod.lin_lora"),
    ("ff.net.0.proj", "img_mlp_lora_1"),
    ("ff.net.2", "img_mlp_lora_2"),
)
SINGLE_HOOKS = (("norm.linear", "modulation.lin_lora"), ("proj_out", "processor.ref_proj_lora"))


def install(transformer: torch.nn.Module, pairs: dict[str, LoraPair] | None = None) -> BankState:
    """DreamFit processors and LoRA hooks on the blocks `pairs` has weights for (every block when `pairs` is
    None: the bank mechanism without LoRAs); returns the shared state that switches between plain, write and
    read. Blocks without weights keep their processor and stay plain FLUX in every mode (no LoRA, no bank),
    as blocks left out by the official loader do."""
    state = BankState()
    blocks = None if pairs is None else covered_blocks(pairs)
    pairs = pairs or {}
    processors = dict(transformer.attn_processors)
    for name in processors:
        block = name.rsplit(".attn.processor", 1)[0]
        if blocks is None or block in blocks:
            processors[name] = DreamFitProcessor(block, block.startswith("transformer_blocks."), pairs, state)
    transformer.set_attn_processor(processors)
    for kind, hooks in (("transformer_blocks", DOUBLE_HOOKS), ("single_transformer_blocks", SINGLE_HOOKS)):
        for i, _ in enumerate(getattr(transformer, kind)):
            for module_name, lora in hooks:
                pair = pairs.get(f"{kind}.{i}.{lora}")
                if pair is not None:
                    transformer.get_submodule(f"{kind}.{i}.{module_name}").register_forward_hook(_hook(pair, state))
    return state


def bank_checkpointing(state: BankState, passes: tuple[str, ...] = ("write", "read")) -> Callable[..., Any]:
    """diffusers' `gradient_checkpointing_func` for a transformer with DreamFit processors. The loss
    clears the banks and switches the mode off before the backward pass; the recompute of each block
    must still run the write pass's LoRAs, or read the banks, exactly as the original call did.
    `passes`: the passes checkpointed (the write pass alone keeps most of the saving at less recompute)."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed(module: torch.nn.Module, *args: Any) -> Any:
        if state.mode not in passes:
            return module(*args)
        mode, negative_branch = state.mode, state.reading_negative
        banks, negative = dict(state.banks), dict(state.negative)  # references, not copies of the tensors

        @contextlib.contextmanager
        def as_called() -> Iterator[None]:
            before = (state.mode, state.banks, state.negative, state.reading_negative, state.replaying)
            state.mode, state.banks, state.negative = mode, banks, negative
            state.reading_negative, state.replaying = negative_branch, True
            try:
                yield
            finally:
                state.mode, state.banks, state.negative, state.reading_negative, state.replaying = before

        return checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), as_called())
        )

    return checkpointed


@torch.no_grad()
def write_banks(transformer: torch.nn.Module, state: BankState, negative: bool = False, **inputs: Any) -> None:
    """The write pass: one transformer call on the reference (timestep 0), storing every block's bank;
    with `negative`, the banks of true CFG's negative branch (kept beside the positive ones)."""
    if not negative:
        state.clear()
    state.mode = "write"
    state.reading_negative = negative
    state.write_passes += 1
    try:
        transformer(**inputs)
    finally:
        state.mode = "read"
        state.reading_negative = False
