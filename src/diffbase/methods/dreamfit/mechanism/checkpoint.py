"""DreamFit's official checkpoints (`flux_i2i.bin`, `flux_i2i_with_pose.bin`, `flux_tryon.bin`):
read, checked against a FLUX.1 transformer, and mapped onto diffusers' block names.

Facts from the official code (run on tiny weights; docs/DREAMFIT.md): pickled dicts of
low-rank pairs `<block>.<name>.{down,up}.weight` with BFL block names (`double_blocks.{i}`,
`single_blocks.{i}`); the rank is read from each pair's down weight; each layer's scale is
alpha / rank (released configs: alpha 16, doubled with the rank for the single blocks' 15360-wide
`ref_proj_lora`). `lora_weight` applies to the processor LoRAs only, and the official loader
multiplies both down and up by it, so its effect is squared; `linear` is offered as an option.

A checkpoint may cover only some blocks: those get the DreamFit processor, the others stay plain FLUX
(no LoRA, no bank), as blocks left out of the official loader's `double_blocks` / `single_blocks` do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffbase.errors import UserError

KEY = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)\.(down|up)\.weight$")
DOUBLE = (
    "img_mod.lin_lora",
    "txt_mod.lin_lora",
    "img_mlp_lora_1",
    "img_mlp_lora_2",
    "processor.ref_qkv_lora_q",
    "processor.ref_qkv_lora_k",
    "processor.ref_qkv_lora_v",
    "processor.ref_proj_lora1",
)
SINGLE = (
    "modulation.lin_lora",
    "processor.ref_qkv_lora_q",
    "processor.ref_qkv_lora_k",
    "processor.ref_qkv_lora_v",
    "processor.ref_proj_lora",
)
NETWORK_ALPHA = 16.0  # the released configs' network_alpha


@dataclass(frozen=True)
class Dims:
    """The widths a DreamFit checkpoint must match: FLUX.1's hidden size and MLP width."""

    hidden: int
    mlp: int
    double: int
    single: int

    @classmethod
    def of(cls, transformer: Any) -> Dims:
        c = transformer.config
        hidden = c.num_attention_heads * c.attention_head_dim
        return cls(hidden, int(hidden * 4), c.num_layers, c.num_single_layers)

    def shapes(self, kind: str, name: str) -> tuple[int, int]:
        """(in, out) features of a LoRA pair."""
        h, m = self.hidden, self.mlp
        table = {
            "img_mod.lin_lora": (h, 6 * h),
            "txt_mod.lin_lora": (h, 6 * h),
            "img_mlp_lora_1": (h, m),
            "img_mlp_lora_2": (m, h),
            "processor.ref_proj_lora1": (h, h),
            "modulation.lin_lora": (h, 3 * h),
            "processor.ref_proj_lora": (h + m, h),
        }
        return table.get(name, (h, h))  # the q/k/v LoRAs are hidden -> hidden


@dataclass
class LoraPair:
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    scale: float  # alpha / rank, times lora_weight where it applies

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.T.to(x) @ self.up.T.to(x)) * self.scale


def diffusers_name(kind: str, index: int, name: str) -> str:
    block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
    return f"{block}.{index}.{name}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--checkpoint: {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable DreamFit checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors (a DreamFit .bin checkpoint)")
    return state


def load_dreamfit(
    path: str | Path,
    transformer: Any,
    lora_weight: float = 1.0,
    lora_weight_mode: Literal["official", "linear"] = "official",
) -> dict[str, LoraPair]:
    """The checkpoint's LoRA pairs by diffusers name, after checking every key and shape against the
    transformer. A checkpoint may cover only some blocks (the official loader installs its processors on
    a chosen subset and leaves the other blocks plain); a covered block needs all of its pairs.
    `official`: processor LoRAs scaled by lora_weight**2 (both halves multiplied, as the official loader
    does); `linear`: by lora_weight."""
    path = Path(path)
    dims = Dims.of(transformer)
    found, unknown = _group(read_state_dict(path), _expected(dims))
    covered = _covered_keys(found)
    missing = sorted(covered - {k for k, v in found.items() if set(v) == {"down", "up"}}, key=_order)
    if missing or unknown or not covered:
        raise UserError(
            f"{path}: not a DreamFit checkpoint for this FLUX.1 ({dims.double} double, {dims.single} "
            f"single blocks, width {dims.hidden}): {_problems(missing, unknown)}"
        )
    factor = lora_weight**2 if lora_weight_mode == "official" else lora_weight
    return {_diffusers_key(key): _pair(path, key, found[key], dims, factor) for key in sorted(covered, key=_order)}


def covered_blocks(pairs: dict[str, Any]) -> set[str]:
    """The diffusers blocks (`transformer_blocks.{i}`, `single_transformer_blocks.{i}`) with LoRA pairs:
    where the DreamFit processors go; every other block stays plain FLUX, as officially."""
    return {".".join(name.split(".", 2)[:2]) for name in pairs}


def _expected(dims: Dims) -> set[str]:
    """Every pair name (BFL block names, without .down/.up) a full checkpoint for `dims` holds."""
    expected = {f"double_blocks.{i}.{n}" for i in range(dims.double) for n in DOUBLE}
    return expected | {f"single_blocks.{i}.{n}" for i in range(dims.single) for n in SINGLE}


def _group(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The tensors by pair name and half, and the keys no block of this transformer can use (foreign keys,
    blocks it does not have, names DreamFit does not define)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        m = KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        kind, index, name, half = m.groups()
        found.setdefault(f"{kind}_blocks.{index}.{name}", {})[half] = value
    unknown += sorted(k + ".*" for k in set(found) - expected)
    return {k: v for k, v in found.items() if k in expected}, unknown


def _covered_keys(found: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    """Every pair name of the blocks the checkpoint has any weight for (a block is all or nothing)."""
    blocks = {".".join(k.split(".", 2)[:2]) for k in found}
    return {f"{b}.{n}" for b in blocks for n in (DOUBLE if b.startswith("double") else SINGLE)}


def _problems(missing: list[str], unknown: list[str]) -> str:
    """One line: the first missing pair and the first unusable key, with counts of the rest."""
    if not missing and not unknown:
        return "no DreamFit LoRA pairs"
    parts = []
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        parts.append(f"missing {missing[0]}.{{down,up}}.weight{more}")
    if unknown:
        parts.append(f"unused {unknown[0]}" + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    return "; ".join(parts)


def _diffusers_key(key: str) -> str:
    kind, index, name = key.split("_blocks.", 1)[0], int(key.split(".")[1]), key.split(".", 2)[2]
    return diffusers_name(kind, index, name)


def _pair(path: Path, key: str, halves: dict[str, torch.Tensor], dims: Dims, factor: float) -> LoraPair:
    """One checked pair with its scale: alpha / rank, times `factor` on the processor LoRAs."""
    kind, name = key.split("_blocks.", 1)[0], key.split(".", 2)[2]
    down, up = halves["down"], halves["up"]
    fan_in, fan_out = dims.shapes(kind, name)
    rank = down.shape[0]
    if down.dim() != 2 or up.dim() != 2 or down.shape[1] != fan_in or up.shape != (fan_out, rank):
        raise UserError(
            f"{path}: {key}: down {tuple(down.shape)} and up {tuple(up.shape)}, expected "
            f"(rank, {fan_in}) and ({fan_out}, rank)"
        )
    alpha = NETWORK_ALPHA * (2 if name == "processor.ref_proj_lora" else 1)
    scale = alpha / rank * (factor if name.startswith("processor.") else 1.0)
    return LoraPair(down.float(), up.float(), scale)


def save_official(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """Write LoRA pairs (keyed by BFL name, without .down/.up) in the official pickled layout."""
    from diffbase.io import atomic_write

    state = {}
    for key, (down, up) in pairs.items():
        state[f"{key}.down.weight"] = down.detach().cpu().contiguous()
        state[f"{key}.up.weight"] = up.detach().cpu().contiguous()
    return atomic_write(path, lambda p: torch.save(state, p))


def random_official(dims: Dims, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A checkpoint of the official layout with random weights, for tests and tiny models."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind, count, names in (("double", dims.double, DOUBLE), ("single", dims.single, SINGLE)):
        for i in range(count):
            for name in names:
                fan_in, fan_out = dims.shapes(kind, name)
                r = rank * (2 if name == "processor.ref_proj_lora" else 1)
                out[f"{kind}_blocks.{i}.{name}"] = (
                    torch.randn(r, fan_in, generator=g) * 0.02,
                    torch.randn(fan_out, r, generator=g) * 0.02,
                )
    return out


def _order(key: str) -> tuple[int, int, str]:
    kind, index = key.split("_blocks.")[0], int(key.split(".")[1])
    return (0 if kind == "double" else 1, index, key)
