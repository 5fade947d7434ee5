"""DreamO's routing and placeholder losses (the paper's; the official training code was never released).

On a configurable subset of blocks the DreamO processor (diffbase.methods.dreamo.mechanism.processor) computes the block's
attention as diffusers' FluxAttnProcessor does and, beside it, only the small maps the losses need (no
full attention map):

- routing, per reference i: softmax over the noisy-image keys of q(reference i's tokens) k(noisy)^T / sqrt(d),
  averaged over reference i's tokens and the heads: a distribution over the target's tokens. The loss is the
  MSE between it and reference i's subject mask (on the packed latent grid) normalised to sum 1, both
  scaled by the token count (so a uniform map reads 1): zero exactly when the attention is spread evenly
  over the subject and nowhere else.
- placeholder, per `[ref#j]` text token: softmax over all reference tokens' keys, summed per reference:
  which reference the placeholder attends to. The loss is the MSE against the one-hot of reference j.

Both are averaged over the probed blocks. Maps are computed while a `layout` is set and gradients are on,
and kept only while `collecting` (the loss's forward pass): gradient checkpointing's recompute computes
them again (its saved tensors must match the first pass) but keeps nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Layout:
    """Where things sit in the joint sequence [text, noisy, references] of one batch."""

    text: int
    noisy: int
    references: list[int]  # token count per reference
    placeholders: list[list[tuple[int, int]]] = field(default_factory=list)  # per sample: (text position, reference)


@dataclass
class Probes:
    collecting: bool = False
    layout: Layout | None = None
    route: list[torch.Tensor] = field(default_factory=list)  # per block: (B, references, noisy)
    holder: list[list[torch.Tensor]] = field(default_factory=list)  # per block: per sample (placeholders, refs)

    def clear(self) -> None:
        self.route.clear()
        self.holder.clear()
        self.collecting, self.layout = False, None


def _softmax_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, n, H, d), k (B, m, H, d) -> softmax over m of q k^T / sqrt(d), (B, H, n, m), in fp32."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1)


def record(probes: Probes, q: torch.Tensor, k: torch.Tensor) -> None:
    """The maps of one block from its post-RoPE queries and keys over [text, noisy, references]."""
    lay = probes.layout
    start = lay.text + lay.noisy
    noisy_k = k[:, lay.text : start]
    bounds = [start + sum(lay.references[:i]) for i in range(len(lay.references) + 1)]
    route = [
        _softmax_rows(q[:, bounds[i] : bounds[i + 1]], noisy_k).mean(dim=(1, 2)) for i in range(len(lay.references))
    ]
    holders = []
    ref_k = k[:, start:]
    for b, marks in enumerate(lay.placeholders):
        if not marks:
            holders.append(q.new_zeros(0, len(lay.references)))
            continue
        rows = q[b : b + 1, [pos for pos, _ in marks]]
        p = _softmax_rows(rows, ref_k[b : b + 1]).mean(dim=1)[0]  # (placeholders, reference tokens)
        holders.append(torch.stack([p[:, bounds[i] - start : bounds[i + 1] - start].sum(-1)
                                    for i in range(len(lay.references))], dim=-1))  # fmt: skip
    if probes.collecting:
        probes.route.append(torch.stack(route, dim=1) if route else q.new_zeros(q.shape[0], 0, lay.noisy))
        probes.holder.append(holders)


def route_terms(probes: Probes, masks: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-reference errors, how many references have a mask): the routing loss is their ratio,
    over one batch or over the batches of several processes. masks (B, references, noisy) on the packed grid;
    present (B, references) bool: which have a mask."""
    maps = torch.stack(probes.route).mean(0)  # (B, references, noisy)
    n = maps.shape[-1]
    target = masks.float() / masks.float().sum(-1, keepdim=True).clamp_min(1e-8)
    err = ((maps - target) * n).pow(2).mean(-1)  # (B, references)
    weight = present.float()
    return (err * weight).sum(), weight.sum()


def route_loss(probes: Probes, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    total, count = route_terms(probes, masks, present)
    return total / count.clamp_min(1.0)


def holder_terms(probes: Probes) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the samples with placeholders of their MSE, how many such samples): the placeholder loss is
    their ratio. A sample's MSE: each placeholder's attention mass per reference against its one-hot."""
    lay = probes.layout
    terms = []
    for b, marks in enumerate(lay.placeholders if lay else []):
        if not marks:
            continue
        p = torch.stack([blocks[b] for blocks in probes.holder]).mean(0)  # (placeholders, references)
        onehot = torch.zeros_like(p)
        onehot[torch.arange(len(marks)), torch.tensor([r for _, r in marks])] = 1
        terms.append((p - onehot).pow(2).mean())
    zero = probes.route[0].new_zeros(()) if probes.route else torch.zeros(())
    if not terms:
        return zero, zero
    return torch.stack(terms).sum(), zero + len(terms)


def holder_loss(probes: Probes) -> torch.Tensor:
    """MSE of each placeholder's attention mass per reference against its one-hot, averaged over the samples."""
    total, count = holder_terms(probes)
    return total / count.clamp_min(1.0)
