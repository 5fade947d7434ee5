"""LoRA files in the layouts people use: diffusers/peft, kohya (ComfyUI) and, for FLUX.1, XLabs.

Plain functions over state dicts. Keys on the diffusers side are peft keys with the pipeline
component prefix (`unet.` or `transformer.`), `...lora_A.weight` / `...lora_B.weight`, and the
LoRA scale (alpha / rank) of each layer is given separately, because peft keeps it in the
adapter config rather than in the weights. FLUX.1 kohya and XLabs names are BFL module names,
mapped through the same table as full checkpoints (`bfl_flux`), with widths read from tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffbase.models import families
from diffbase.models.bfl_flux import DOUBLE, GLOBAL, SINGLE

KOHYA_FLUX_MARKERS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")


def lora_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer path: (A, B)} from peft keys `<path>.lora_A.weight` / `<path>.lora_B.weight`."""
    layers = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            path = key.removesuffix(".lora_A.weight")
            layers[path] = (a, state[f"{path}.lora_B.weight"])
    return layers


def peft_scales(module: torch.nn.Module, prefix: str, adapter: str = "default") -> dict[str, float]:
    """alpha / rank of every LoRA layer of `module`, keyed like `lora_layers` keys."""
    return {
        f"{prefix}.{name}": float(sub.scaling[adapter])
        for name, sub in module.named_modules()
        if adapter in getattr(sub, "scaling", {})
    }


# --------------------------------------------------------------------------- kohya


def _kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def _flux_rows() -> list[tuple[str, list[str], str, str]]:
    """(BFL module template, diffusers templates, how, block kind) with `{i}` for the block index."""
    rows = [(b, d, how, "global") for b, d, how in GLOBAL]
    rows += [
        (f"double_blocks.{{i}}.{b}", [f"transformer_blocks.{{i}}.{x}" for x in d], how, "double")
        for b, d, how in DOUBLE
    ]
    rows += [
        (f"single_blocks.{{i}}.{b}", [f"single_transformer_blocks.{{i}}.{x}" for x in d], how, "single")
        for b, d, how in SINGLE
    ]
    return rows


def _block_indices(paths: list[str], kind: str) -> list[int]:
    if kind == "global":
        return [0]
    marker = "transformer.transformer_blocks." if kind == "double" else "transformer.single_transformer_blocks."
    return sorted({int(p.removeprefix(marker).split(".")[0]) for p in paths if p.startswith(marker)})


def _fuse(
    parts: list[tuple[torch.Tensor, torch.Tensor] | None], dims: list[int], scale: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate (A, B) LoRAs of the slices of one fused layer as one block-sparse LoRA, scales baked in B."""
    present = [p for p in parts if p is not None]
    rank = present[0][0].shape[0]
    fan_in = present[0][0].shape[1]
    like = present[0][0]
    downs, ups = [], torch.zeros(sum(dims), rank * len(parts), dtype=like.dtype, device=like.device)
    row = 0
    for j, (part, dim) in enumerate(zip(parts, dims, strict=True)):
        zeros = (torch.zeros(rank, fan_in, dtype=like.dtype, device=like.device), like.new_zeros(dim, rank))
        a, b = part if part is not None else zeros
        downs.append(a)
        ups[row : row + dim, j * rank : (j + 1) * rank] = b * scale[j]
        row += dim
    return torch.cat(downs, dim=0), ups


def to_kohya(
    state: dict[str, torch.Tensor], scales: dict[str, float], family: str, dims: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """A peft LoRA in kohya/ComfyUI names: `lora_unet_<module>.lora_down/.lora_up/.alpha`.

    UNet families use diffusers module names (as sd-scripts does for SD1.5/SDXL); FLUX.1 uses BFL
    names with q/k/v (and the single blocks' MLP input) fused, which needs each slice's output
    width in `dims` for slices the LoRA does not cover.
    """
    layers = lora_layers(state)
    out: dict[str, torch.Tensor] = {}
    if not families.get(family).bfl_layout:
        for path, (a, b) in layers.items():
            name = _kohya(path.split(".", 1)[1])
            out[f"{name}.lora_down.weight"] = a
            out[f"{name}.lora_up.weight"] = b
            out[f"{name}.alpha"] = torch.tensor(scales[path] * a.shape[0])
        return out
    for bfl, names, how, kind in _flux_rows():
        for i in _block_indices(list(layers), kind):
            paths = ["transformer." + n.format(i=i) for n in names]
            if not any(p in layers for p in paths):
                continue
            name = _kohya(bfl.format(i=i))
            if how == "split":
                widths = [layers[p][1].shape[0] if p in layers else (dims or {})[p] for p in paths]
                down, up = _fuse([layers.get(p) for p in paths], widths, [scales.get(p, 1.0) for p in paths])
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
                out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # scales are baked into up
            else:
                a, b = layers[paths[0]]
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
                out[f"{name}.alpha"] = torch.tensor(scales[paths[0]] * a.shape[0])
    return out


def kohya_flux_to_diffusers(state: dict[str, torch.Tensor], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """A kohya/ComfyUI FLUX.1 LoRA as peft keys with scale 1 baked in; `widths` gives each diffusers
    layer's output size (read from the model, so any model width works)."""
    out: dict[str, torch.Tensor] = {}
    for bfl, names, how, kind in _flux_rows():
        indices = (
            [0]
            if kind == "global"
            else sorted({int(k.split("_")[4]) for k in state if k.startswith(f"lora_unet_{kind}_blocks_")})
        )
        for i in indices:
            name = _kohya(bfl.format(i=i))
            if f"{name}.lora_down.weight" not in state:
                continue
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            scale = float(state.get(f"{name}.alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
            paths = ["transformer." + n.format(i=i) for n in names]
            if how != "split":
                out[f"{paths[0]}.lora_A.weight"], out[f"{paths[0]}.lora_B.weight"] = down, up * scale
                continue
            dims = [widths[p] for p in paths]
            ups = torch.split(up * scale, dims, dim=0)
            for p, u in zip(paths, ups, strict=True):  # dense: each slice keeps the whole down
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = down, u.contiguous()
    return out | kohya_clip_to_diffusers(state)


def kohya_clip_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's layers of a kohya FLUX.1 LoRA (`lora_te1_text_model_encoder_layers_N_...`) as peft
    keys under `text_encoder.`, scale baked in."""
    import re

    pattern = re.compile(r"lora_te1_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)\.lora_down\.weight")
    out: dict[str, torch.Tensor] = {}
    for key, down in state.items():
        found = pattern.fullmatch(key)
        if found is None:
            continue
        name = key.removesuffix(".lora_down.weight")
        scale = float(state.get(f"{name}.alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
        path = "text_encoder.text_model.encoder.layers.{}.{}.{}".format(*found.groups())
        out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = down, state[f"{name}.lora_up.weight"] * scale
    return out


def is_kohya_flux(keys: list[str]) -> bool:
    return any(k.startswith(KOHYA_FLUX_MARKERS) for k in keys)


def text_encoder_kohya(
    state: dict[str, torch.Tensor], scales: dict[str, float], prefix: str
) -> dict[str, torch.Tensor]:
    """A text encoder's peft LoRA (keys `<component>.<path>.lora_A.weight`) in kohya names:
    `<prefix>_text_model_<path>` (transformers 5's CLIP has no `text_model` level; kohya's names do)."""
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in lora_layers(state).items():
        inner = path.split(".", 1)[1]
        name = f"{prefix}_" + ("" if inner.startswith("text_model.") else "text_model_") + inner.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
        out[f"{name}.alpha"] = torch.tensor(scales[path] * a.shape[0])
    return out


# --------------------------------------------------------------------------- XLabs (FLUX.1)

XLABS = {
    "double": [
        ("processor.qkv_lora1", ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ("processor.qkv_lora2", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        ("processor.proj_lora1", ["attn.to_out.0"]),
        ("processor.proj_lora2", ["attn.to_add_out"]),
    ],
    "single": [("processor.qkv_lora", ["attn.to_q", "attn.to_k", "attn.to_v"]), ("processor.proj_lora", ["proj_out"])],
}


def to_xlabs(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A FLUX.1 peft LoRA in XLabs names (`double_blocks.N.processor.qkv_lora1.down.weight`, ...).
    XLabs files carry no alpha, so each layer's scale is baked into its up weight."""
    layers = lora_layers(state)
    out: dict[str, torch.Tensor] = {}
    for kind, prefix in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        for i in _block_indices(list(layers), kind):
            for xname, parts in XLABS[kind]:
                paths = [f"transformer.{prefix}.{i}.{p}" for p in parts]
                if not all(p in layers for p in paths):
                    continue
                widths = [layers[p][1].shape[0] for p in paths]
                down, up = _fuse([layers[p] for p in paths], widths, [scales[p] for p in paths])
                block = "double_blocks" if kind == "double" else "single_blocks"
                out[f"{block}.{i}.{xname}.down.weight"] = down
                out[f"{block}.{i}.{xname}.up.weight"] = up
    return out


# --------------------------------------------------------------------------- LyCORIS (LoKr, LoHa)

# peft's LoKr and LoHa tensors keep LyCORIS's names and shapes; only the layer names and the scale differ.
LYCORIS_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # fmt: skip


def is_lycoris(keys: list[str]) -> bool:
    return any(k.rpartition(".")[2] in LYCORIS_PARTS for k in keys)


LYCORIS_TYPES = ("lokr", "loha")  # the training.lora.type values written and read as LyCORIS files


def lycoris_prefix(unet: bool) -> str:
    """How ComfyUI names a LyCORIS file's layers: kohya's `lora_unet_` for UNets, SimpleTuner's `lycoris_`
    (diffusers module names) for transformers."""
    return "lora_unet_" if unet else "lycoris_"


def lycoris_name(path: str, unet: bool) -> str:
    return lycoris_prefix(unet) + path.replace(".", "_")


def file_layer_names(module: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, str]:
    """{a layer's name in a kohya or LyCORIS file: its path in `module`} for every Linear layer, a peft-wrapped one
    by its own path (not `.base_layer`), so a model that already carries adapters maps the same."""
    paths = [n.removesuffix(".base_layer") for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    return {prefix + path.replace(".", "_"): path for path in paths for prefix in prefixes}


def lycoris_layers(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {part: tensor}} (parts: LYCORIS_PARTS and `alpha`)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer, _, part = key.rpartition(".")
        layers.setdefault(layer, {})[part] = value
    return layers


def lycoris_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank `alpha` is divided by, as ComfyUI reads it (None: a LoKr of full factors, whose alpha is unused)."""
    if "hada_w1_b" in parts:
        return parts["hada_w1_b"].shape[0]
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in parts:
            return parts[name].shape[0]
    return None


def lycoris_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight change of one LoKr or LoHa layer, times alpha / rank (unshaped: the caller reshapes)."""

    def factor(name: str) -> torch.Tensor:
        return parts[name].float() if name in parts else parts[f"{name}_a"].float() @ parts[f"{name}_b"].float()

    if "hada_w1_a" in parts:
        delta = factor("hada_w1") * factor("hada_w2")
    else:
        delta = torch.kron(factor("lokr_w1"), factor("lokr_w2"))
    rank = lycoris_rank(parts)
    scale = float(parts["alpha"]) / rank if "alpha" in parts and rank is not None else 1.0
    return delta * scale


def to_lycoris(state: dict[str, torch.Tensor], scales: dict[str, float], unet: bool) -> dict[str, torch.Tensor]:
    """A peft LoKr or LoHa (keys `<path>.lokr_w1`, ...) as a LyCORIS file: peft's alpha / rank is baked into the
    first factor and `alpha` is written equal to the rank, so every reader applies scale 1."""
    out: dict[str, torch.Tensor] = {}
    for path, parts in lycoris_layers(state).items():
        parts = dict(parts)
        first = next(p for p in ("lokr_w1", "lokr_w1_a", "hada_w1_a") if p in parts)
        parts[first] = parts[first] * scales[path]
        name = lycoris_name(path.split(".", 1)[1], unet)
        out.update({f"{name}.{part}": tensor for part, tensor in parts.items()})
        rank = lycoris_rank(parts)
        if rank is not None:
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def save_lora(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA safetensors file atomically."""
    from safetensors.torch import save_file

    from diffbase.io import atomic_write

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def save_diffusers_lora(
    pipeline_cls: type,
    folder: str | Path,
    denoiser_name: str,
    denoiser: torch.nn.Module,
    encoders: dict[str, torch.nn.Module] | None = None,
    adapter: str = "default",
) -> Path:
    """The denoiser's (and text encoders') LoRA in diffusers format, with each peft config (alpha, rank, DoRA,
    rsLoRA) in the file's metadata so that `load_lora_weights` restores the same layers and scale."""
    from peft.utils import get_peft_model_state_dict

    args = {}
    for name, module in {denoiser_name: denoiser, **(encoders or {})}.items():
        args[f"{name}_lora_layers"] = get_peft_model_state_dict(module, adapter_name=adapter)
        args[f"{name}_lora_adapter_metadata"] = module.peft_config[adapter].to_dict()
    pipeline_cls.save_lora_weights(folder, **args)
    return Path(folder) / "pytorch_lora_weights.safetensors"
