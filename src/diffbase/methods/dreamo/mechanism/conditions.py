"""DreamO's condition layout on FLUX.1 (facts: docs/DREAMO.md, checked against the official code).

- Each reference's latent is packed and appended after the noisy tokens; the output is sliced back.
- Position ids are diagonal in packed units (pixels / 16): reference k's grid starts at
  (H/16 + the heights of the references before it, W/16 + their widths); the first axis is 0.
- After `x_embedder` (bias included) the noisy tokens get `task[1]`, reference k gets
  `task[0] + idx[k]` (the task index is 0 for every task; k is the reference's 1-based slot, and an
  empty slot still counts).
- The T5 vocabulary gets `[ref#1]`..`[ref#9]` and `[res]`: first resized to the tokenizer's length,
  then the ten tokens added, so they take the ten ids after it (32100-32109 for FLUX.1's T5), with
  the rows shipped in the official embedding file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

PLACEHOLDERS = [f"[ref#{i}]" for i in range(1, 10)] + ["[res]"]
TASKS = ("ip", "id", "style", "tryon")  # tryon: the garment as a subject reference (the same task index)
STYLE_PREFIX = "generate a same style image."
MAX_REFERENCES = 9  # idx_embedding has 10 rows; row 0 is never used by a reference
NOISY_TASK, REFERENCE_TASK = 1, 0


class DreamOEmbeddings(torch.nn.Module):
    """The trainable condition embeddings (task and index, the model's width) and the ten new T5 rows."""

    def __init__(self, width: int, t5_width: int) -> None:
        super().__init__()
        self.t5 = torch.nn.Embedding(len(PLACEHOLDERS), t5_width)
        self.task = torch.nn.Embedding(2, width)
        self.idx = torch.nn.Embedding(MAX_REFERENCES + 1, width)

    @classmethod
    def for_pipe(cls, pipe: Any) -> DreamOEmbeddings:
        c = pipe.transformer.config
        return cls(c.num_attention_heads * c.attention_head_dim, pipe.text_encoder_2.config.d_model)

    def init_for_training(self, t5_rows: torch.Tensor) -> None:
        """Condition embeddings at zero (training starts from plain reference tokens); the T5 rows the ones
        added to the tokenizer (kept fixed)."""
        with torch.no_grad():
            self.task.weight.zero_()
            self.idx.weight.zero_()
            self.t5.weight.copy_(t5_rows)
        self.t5.weight.requires_grad_(False)

    def forward(self, noisy: int, references: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
        """`sequence` as the module's call: training calls it through the module's DDP wrapper, which then
        reduces the embeddings' gradients across processes."""
        return self.sequence(noisy, references, dtype)

    def sequence(self, noisy: int, references: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
        """(1, noisy + sum of reference tokens, width): what is added after x_embedder. `references` holds
        (token count, 1-based index) per reference."""
        parts = [self.task.weight[NOISY_TASK].expand(noisy, -1)]
        for count, index in references:
            parts.append((self.task.weight[REFERENCE_TASK] + self.idx.weight[index]).expand(count, -1))
        return torch.cat(parts, dim=0)[None].to(dtype)


def add_placeholder_tokens(tokenizer: Any, text_encoder: Any, rows: torch.Tensor) -> list[int]:
    """The official order: resize T5's vocabulary to the tokenizer, add the ten tokens, resize again and
    write `rows` into the last ten. Returns the tokens' ids. A second call only rewrites the rows."""
    if PLACEHOLDERS[0] not in tokenizer.get_vocab():
        text_encoder.resize_token_embeddings(len(tokenizer))
        tokenizer.add_tokens(PLACEHOLDERS, special_tokens=False)
        text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(PLACEHOLDERS)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows.to(weight)
    return ids


def reference_ids(target_hw: tuple[int, int], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Position ids (tokens, 3) per reference: packed grid `grids[k]` (rows, cols) placed diagonally
    after the target's packed grid `target_hw` and the references before it."""
    start_h, start_w = target_hw
    out = []
    for rows, cols in grids:
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None] + start_h
        ids[..., 2] = torch.arange(cols)[None, :] + start_w
        out.append(ids.reshape(rows * cols, 3))
        start_h, start_w = start_h + rows, start_w + cols
    return out


@dataclass
class ReferenceTokens:
    """The references of one generation or batch, ready for the transformer."""

    tokens: torch.Tensor  # (B, sum of reference tokens, 64): packed latents
    ids: torch.Tensor  # (sum of reference tokens, 3)
    counts: list[int]  # tokens per reference
    indices: list[int]  # 1-based index per reference


def pack_references(
    pipe: Any, latents: list[torch.Tensor], indices: list[int], target_hw: tuple[int, int]
) -> ReferenceTokens:
    """Normalised reference latents (B, 16, h, w) -> packed tokens and diagonal ids; `target_hw` is the
    target's packed grid (H/16, W/16)."""
    packed = [pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3]) for z in latents]
    grids = [(z.shape[2] // 2, z.shape[3] // 2) for z in latents]
    ids = reference_ids(target_hw, grids)
    device = latents[0].device
    return ReferenceTokens(
        torch.cat(packed, dim=1), torch.cat(ids).to(device), [p.shape[1] for p in packed], list(indices)
    )


@contextlib.contextmanager
def added_after_x_embedder(transformer: torch.nn.Module, embeddings: torch.Tensor | None) -> Iterator[None]:
    """Adds `embeddings` to the output of the transformer's `x_embedder` while the block runs (as the
    official forward adds them before the blocks). None: nothing is added."""
    if embeddings is None:
        yield
        return

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + embeddings.to(output.dtype)

    handle = transformer.x_embedder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
