"""DreamO's official files (`dreamo.safetensors` and the LoRAs fused with it), read and written.

Facts from the official code (docs/DREAMO.md):
- `dreamo.safetensors` holds the condition embeddings (`dreamo_t5_embedding.weight`, of which the
  last ten rows are used; `dreamo_task_embedding.weight` (2, width); `dreamo_idx_embedding.weight`
  (10, width)) and one LoRA in XLabs names with an underscore before the block index:
  `double_blocks_{i}.processor.{qkv_lora1,qkv_lora2,proj_lora1,proj_lora2}.{down,up}.weight` and
  `single_blocks_{i}.processor.{qkv_lora,proj_lora}...`.
- A qkv pair's down weight is shared by q, k and v and its up weight is split in thirds; there is no
  alpha, so a layer's delta is weight * up @ down.
- The default load path fuses dreamo 1, cfg-distill 1, Turbo 1 (unless `--no_turbo`), SFT 1, DPO 1.25,
  in that order. The app's `--version v1` changes only its guidance (3.5): its default load path never
  passes the version on, so v1.1's LoRAs are fused (only the nunchaku path fuses v1's quality LoRAs).
  The fusion uses diffusers' own `load_lora_weights` / `set_adapters` / `fuse_lora`, as the official code.
- Turbo is FLUX.1-Turbo-Alpha's `diffusion_pytorch_model.safetensors`, which the official code downloads
  into the same `models/` folder as the DreamO files: diffbase fuses it when the DreamO folder has it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError

EMBEDDING_KEYS = ("dreamo_t5_embedding.weight", "dreamo_task_embedding.weight", "dreamo_idx_embedding.weight")
KEY = re.compile(
    r"^(double|single)_blocks_(\d+)\.processor\.(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight$"
)
TARGETS = {  # XLabs layer -> diffusers modules inside the block (a qkv layer's up weight is split in thirds)
    ("double", "qkv_lora1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "qkv_lora2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("double", "proj_lora1"): ("attn.to_out.0",),
    ("double", "proj_lora2"): ("attn.to_add_out",),
    ("single", "qkv_lora"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("single", "proj_lora"): ("proj_out",),
}


def lora_modules(transformer: Any) -> list[str]:
    """The full names of the layers the official file can hold, which a DreamO LoRA trained here adapts
    (not the final `proj_out`, which shares its name with the single blocks' output layer)."""
    names = []
    for kind, prefix in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        for i in range(_block_count(transformer, kind)):
            names += [f"{prefix}.{i}.{m}" for (k, _), mods in TARGETS.items() if k == kind for m in mods]
    return names


TURBO_FILE = "diffusion_pytorch_model.safetensors"  # FLUX.1-Turbo-Alpha, as the official code downloads it


@dataclass(frozen=True)
class Recipe:
    """Which files are fused with the DreamO LoRA, at which weights (paths relative to the DreamO folder),
    the guidance the app defaults to with it, and where Turbo goes in the fusion order."""

    name: str
    loras: tuple[tuple[str, float, bool], ...]  # (file, weight, in DreamO's XLabs layout)
    guidance: float = 4.5
    turbo_at: int = 2  # the official order: dreamo, cfg-distill, then Turbo, then the rest


V1_1 = (
    ("dreamo.safetensors", 1.0, True),
    ("dreamo_cfg_distill.safetensors", 1.0, True),
    ("v1.1/dreamo_sft_lora.safetensors", 1.0, False),
    ("v1.1/dreamo_dpo_lora.safetensors", 1.25, False),
)
RECIPES = {
    "v1.1": Recipe("v1.1", V1_1),
    "v1": Recipe("v1", V1_1, guidance=3.5),  # the official app: v1.1's LoRAs, v1's guidance (see above)
    "none": Recipe("none", (("dreamo.safetensors", 1.0, True),), turbo_at=1),  # a LoRA trained here, on its own
}


def recipe(version: str) -> Recipe:
    if version not in RECIPES:
        raise UserError(f"--version: expected one of {sorted(RECIPES)}, got '{version}'")
    return RECIPES[version]


def turbo_file(folder: Path, given: str | None = None, use: bool = True) -> Path | None:
    """The Turbo LoRA to fuse: `given` (--turbo FILE), else the DreamO folder's TURBO_FILE when it has one
    (the official default fuses Turbo), else none; none at all when `use` is False (--no-turbo)."""
    if not use:
        return None
    if given:
        if not Path(given).is_file():
            raise UserError(f"--turbo: {given}: no such file")
        return Path(given)
    found = folder / TURBO_FILE
    return found if found.is_file() else None


def _block_count(transformer: Any, kind: str) -> int:
    return len(transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks)


def xlabs_to_diffusers(state: dict[str, torch.Tensor], transformer: Any, file: Path) -> dict[str, torch.Tensor]:
    """DreamO's XLabs-layout LoRA as diffusers `transformer.<module>.lora_A/B.weight` keys, checked against
    the transformer (embedding keys are skipped): an unknown key, a block it lacks, a missing half of a pair or a wrong width is a
    one-line error naming the file."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        if "embedding" in key:  # the official converter skips embeddings (they load from dreamo.safetensors)
            continue
        m = KEY.match(key)
        if m is None or (m.group(1), m.group(3)) not in TARGETS:
            raise UserError(f"{file}: unexpected key '{key}' (not a DreamO LoRA layer)")
        kind, index, layer, half = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if index >= _block_count(transformer, kind):
            raise UserError(f"{file}: '{key}' names a block the transformer does not have")
        other = key.replace(f".{half}.", ".up." if half == "down" else ".down.")
        if other not in state:
            raise UserError(f"{file}: '{key}' has no matching '{other}'")
        if half == "up":
            continue
        down, up = state[key], state[other]
        prefix = f"transformer_blocks.{index}" if kind == "double" else f"single_transformer_blocks.{index}"
        modules = TARGETS[(kind, layer)]
        linears = [transformer.get_submodule(f"{prefix}.{name}") for name in modules]
        if down.shape[1] != linears[0].in_features or up.shape[0] != sum(lin.out_features for lin in linears):
            raise UserError(f"{file}: '{key}' does not fit {prefix} (shapes {tuple(down.shape)}, {tuple(up.shape)})")
        ups = torch.split(up, [lin.out_features for lin in linears], dim=0)
        for name, part in zip(modules, ups, strict=True):
            out[f"transformer.{prefix}.{name}.lora_A.weight"] = down
            out[f"transformer.{prefix}.{name}.lora_B.weight"] = part
    return out


def read_dreamo_file(path: Path, transformer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA in diffusers keys, embeddings {t5, task, idx}) from a `dreamo.safetensors`."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: no such file (a DreamO folder holds dreamo.safetensors)")
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
        raise UserError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None
    missing = [k for k in EMBEDDING_KEYS if k not in state]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)} (not a DreamO file)")
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    emb = {name: state.pop(key) for name, key in zip(("t5", "task", "idx"), EMBEDDING_KEYS, strict=True)}
    emb["t5"] = emb["t5"][-10:]  # the official loader keeps the last ten rows
    if emb["task"].shape != (2, width) or emb["idx"].shape != (10, width):
        raise UserError(f"{path}: condition embeddings of shape {tuple(emb['task'].shape)} / "
                        f"{tuple(emb['idx'].shape)}; this transformer needs (2, {width}) / (10, {width})")  # fmt: skip
    return xlabs_to_diffusers(state, transformer, path), emb


def read_lora(path: Path, xlabs: bool, transformer: Any) -> dict[str, torch.Tensor] | str:
    """A LoRA to fuse: DreamO's own layout converted, or any file diffusers' FLUX loader reads (its path)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return xlabs_to_diffusers(load_file(str(path)), transformer, path) if xlabs else str(path)


def fusion_list(folder: Path, version: str, turbo: Path | None) -> list[tuple[str, Path | None, float, bool]]:
    """(adapter name, file or None for dreamo.safetensors, weight, XLabs layout) in the official order."""
    chosen = recipe(version)
    out: list[tuple[str, Path | None, float, bool]] = [
        (f"dreamo_{n}", None if n == 0 else folder / file, weight, xlabs)
        for n, (file, weight, xlabs) in enumerate(chosen.loras)
    ]
    if turbo is not None:
        out.insert(chosen.turbo_at, ("turbo", turbo, 1.0, False))
    return out


def fuse_dreamo(pipe: Any, folder: Path, version: str = "v1.1", turbo: Path | None = None) -> dict[str, torch.Tensor]:
    """Fuse the recipe's LoRAs (and Turbo, when given, third as the official code) into the transformer at
    the official weights, add the placeholder tokens to T5; returns the condition embeddings (t5, task, idx)."""
    from diffbase.methods.dreamo.mechanism.conditions import add_placeholder_tokens

    order = fusion_list(folder, version, turbo)
    transformer = pipe.transformer
    lora, emb = read_dreamo_file(folder / "dreamo.safetensors", transformer)
    for name, file, _, xlabs in order:
        state = lora if file is None else read_lora(file, xlabs, transformer)
        pipe.load_lora_weights(state, adapter_name=name)
    names = [name for name, *_ in order]
    pipe.set_adapters(names, [weight for _, _, weight, _ in order])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    add_placeholder_tokens(pipe.tokenizer_2, pipe.text_encoder_2, emb["t5"])
    return emb


def write_dreamo_file(
    path: Path, lora: dict[str, torch.Tensor], scales: dict[str, float], emb: dict[str, torch.Tensor]
) -> Path:
    """A peft LoRA over `lora_modules` plus the embeddings, in the official layout (scales baked into the
    up weights: the official loader applies none)."""
    from diffbase.models.lora_formats import save_lora, to_xlabs

    state = {re.sub(r"^(double|single)_blocks\.", r"\1_blocks_", k): v for k, v in to_xlabs(lora, scales).items()}
    for name, key in zip(("t5", "task", "idx"), EMBEDDING_KEYS, strict=True):
        state[key] = emb[name]
    return save_lora(state, path)
