"""FLUX.1 transformer weights: BFL layout <-> diffusers layout, widths read from the tensors.

diffusers' own converter fixes the hidden size at 3072, so it cannot convert tiny models; this
one splits fused tensors by the sizes it finds, and gives the same result for real ones. One
table drives both directions.
"""

from __future__ import annotations

import torch

COMFY_PREFIX = "model.diffusion_model."

# (BFL name, diffusers names, how): "copy" one tensor, "split" a fused q/k/v (or q/k/v/mlp) tensor,
# "swap" the two halves (BFL's final modulation is (shift, scale), diffusers' is (scale, shift)).
GLOBAL = [
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], "copy"),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], "copy"),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], "copy"),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], "copy"),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], "copy"),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], "copy"),
    ("txt_in", ["context_embedder"], "copy"),
    ("img_in", ["x_embedder"], "copy"),
    ("final_layer.linear", ["proj_out"], "copy"),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
]
DOUBLE = [
    ("img_mod.lin", ["norm1.linear"], "copy"),
    ("txt_mod.lin", ["norm1_context.linear"], "copy"),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], "split"),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "split"),
    ("img_attn.norm.query_norm", ["attn.norm_q"], "norm"),
    ("img_attn.norm.key_norm", ["attn.norm_k"], "norm"),
    ("txt_attn.norm.query_norm", ["attn.norm_added_q"], "norm"),
    ("txt_attn.norm.key_norm", ["attn.norm_added_k"], "norm"),
    ("img_mlp.0", ["ff.net.0.proj"], "copy"),
    ("img_mlp.2", ["ff.net.2"], "copy"),
    ("txt_mlp.0", ["ff_context.net.0.proj"], "copy"),
    ("txt_mlp.2", ["ff_context.net.2"], "copy"),
    ("img_attn.proj", ["attn.to_out.0"], "copy"),
    ("txt_attn.proj", ["attn.to_add_out"], "copy"),
]
SINGLE = [
    ("modulation.lin", ["norm.linear"], "copy"),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "split"),
    ("norm.query_norm", ["attn.norm_q"], "norm"),
    ("norm.key_norm", ["attn.norm_k"], "norm"),
    ("linear2", ["proj_out"], "copy"),
]


def is_bfl_flux1(keys: list[str]) -> bool:
    return any(k.removeprefix(COMFY_PREFIX).startswith("double_blocks.") and ".img_attn.qkv." in k for k in keys)


def _block_count(keys: list[str], prefix: str) -> int:
    indices = {int(k.split(".")[1]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _rows(keys: list[str], bfl_side: bool) -> list[tuple[str, list[str], str]]:
    """The table expanded for every block present."""
    double = _block_count(keys, "double_blocks." if bfl_side else "transformer_blocks.")
    single = _block_count(keys, "single_blocks." if bfl_side else "single_transformer_blocks.")
    rows = list(GLOBAL)
    for i in range(double):
        rows += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds], how) for b, ds, how in DOUBLE]
    for i in range(single):
        rows += [
            (f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds], how) for b, ds, how in SINGLE
        ]
    return rows


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL (or ComfyUI-prefixed) FLUX.1 transformer state dict in diffusers names.

    Keys the table does not know are returned under their own name, so a caller's strict load
    reports them instead of losing them silently.
    """
    src = {k.removeprefix(COMFY_PREFIX): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for bfl, names, how in _rows(list(src), bfl_side=True):
        suffixes = ["scale"] if how == "norm" else ["weight", "bias"]
        for suffix in suffixes:
            key = f"{bfl}.{suffix}"
            if key not in src:
                continue
            used.add(key)
            tensor = src[key]
            target_suffix = "weight" if how == "norm" else suffix
            if how == "split":
                weight = src[f"{bfl}.weight"]
                hidden = getattr(weight, "quant_shape", weight.shape)[1]  # a GGUF tensor: its logical shape
                sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(names) == 4 else [])
                for name, part in zip(names, torch.split(tensor, sizes, dim=0), strict=True):
                    out[f"{name}.{target_suffix}"] = part.clone()
            else:
                out[f"{names[0]}.{target_suffix}"] = _swap(tensor) if how == "swap" else tensor
    out.update({k: v for k, v in src.items() if k not in used})
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL names (the inverse of `bfl_to_diffusers`)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for bfl, names, how in _rows(list(state), bfl_side=False):
        suffixes = ["weight"] if how == "norm" else ["weight", "bias"]
        for suffix in suffixes:
            keys = [f"{name}.{suffix}" for name in names]
            if not all(k in state for k in keys):
                continue
            used.update(keys)
            target = f"{bfl}.scale" if how == "norm" else f"{bfl}.{suffix}"
            if how == "split":
                out[target] = torch.cat([state[k] for k in keys], dim=0)
            else:
                out[target] = _swap(state[keys[0]]) if how == "swap" else state[keys[0]]
    out.update({k: v for k, v in state.items() if k not in used})
    return out
