"""Attention-only virtual try-on on the SD1.5 UNet: the "vton" (8-channel) and "catvton" (9-channel)
variants, what trains (every `attn1` projection), and CatVTON's released weight layout.

The design document's data flow never lets the garment reach the UNet (only `conditioning[:, :4]`
is used). Here person and garment share one canvas, person on top and garment below
(concatenated along height, as CatVTON does), so self-attention carries garment detail into the
person half. UNet input channels:

- vton:    noisy canvas (4) + masked canvas (4: person with the garment area masked out, garment as is)
- catvton: noisy canvas (4) + mask canvas (1: the person's mask, zeros on the garment half) + masked canvas (4)

CatVTON uses no text: each cross-attention is skipped, so a transformer block adds `norm2(h)` to
`h` (its "SkipAttnProcessor" returns the attention's input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError

VARIANTS = ("vton", "catvton")
CHANNELS = {"vton": 8, "catvton": 9}
ATTN1_PARAMS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
CATVTON_STRIDE = 8  # the official checkpoint lists 8 modules per attention (attn1, its 6 children, its processor)


class SkipAttnProcessor:
    """CatVTON's cross-attention replacement: return the (normed) input, so the block adds norm2(h) to h."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def attn1_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every self-attention, in module order (down blocks, up blocks, mid block, as the UNet registers them)."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]


def expand_conv_in(unet: torch.nn.Module, variant: str) -> None:
    """Give the UNet the variant's input channels. From a 9-channel (inpainting) UNet, `vton` drops the
    mask channel and `catvton` keeps all. From a 4-channel UNet, the masked-canvas channels start as
    copies of the noisy-latent weights (the frozen convolution then reads the masked canvas as it reads
    an image) and the mask channel at zero."""
    conv = unet.conv_in
    have, want = conv.in_channels, CHANNELS[variant]
    if have == want:
        return
    w = conv.weight.data
    if have == 9 and want == 8:
        new_w = torch.cat([w[:, :4], w[:, 5:]], dim=1)
    elif have == 4:
        extra = [torch.zeros_like(w[:, :1])] if want == 9 else []
        new_w = torch.cat([w, *extra, w.clone()], dim=1)
    else:
        raise UserError(f"model: a UNet with {have} input channels cannot become the {variant} variant ({want})")
    new = torch.nn.Conv2d(
        want, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, device=w.device, dtype=w.dtype
    )
    new.weight.data.copy_(new_w)
    new.bias.data.copy_(conv.bias.data)
    unet.conv_in = new
    unet.register_to_config(in_channels=want)


def prepare_unet(unet: torch.nn.Module, variant: str) -> list[torch.nn.Parameter]:
    """Set up the UNet for the variant and freeze all but the `attn1` projections; returns those."""
    if variant not in VARIANTS:
        raise UserError(f"training.tryon.variant: expected one of {list(VARIANTS)}, got '{variant}'")
    expand_conv_in(unet, variant)
    if variant == "catvton":
        processors = {
            name: SkipAttnProcessor() if "attn2" in name.split(".") else proc
            for name, proc in unet.attn_processors.items()
        }
        unet.set_attn_processor(processors)
    unet.requires_grad_(False)
    params = []
    for _, module in attn1_modules(unet):
        for name in ATTN1_PARAMS:
            p = module.get_parameter(name)
            p.requires_grad_(True)
            params.append(p)
    return params


def attn1_count(unet: torch.nn.Module) -> int:
    return sum(module.get_parameter(name).numel() for _, module in attn1_modules(unet) for name in ATTN1_PARAMS)


# --------------------------------------------------------------------------- CatVTON weight layout


def catvton_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`attn1` weights under CatVTON's keys: `{8r}.to_q.weight` ... for the r-th self-attention."""
    out = {}
    for r, (_, module) in enumerate(attn1_modules(unet)):
        for name in ATTN1_PARAMS:
            out[f"{CATVTON_STRIDE * r}.{name}"] = module.get_parameter(name).detach().cpu().contiguous()
    return out


def find_attention_file(path: Path) -> Path:
    """The attention weights in a CatVTON folder (`attention/model.safetensors`), or the file itself."""
    if path.is_file():
        return path
    for candidate in ("attention/model.safetensors", "model.safetensors", "attention/pytorch_model.bin"):
        if (path / candidate).is_file():
            return path / candidate
    raise UserError(f"--weights: no attention/model.safetensors in {path} (a CatVTON folder such as mix-48k-1024)")


def load_catvton_attention(unet: torch.nn.Module, path: Path) -> None:
    """Load CatVTON's released `attn1` weights; every key must be used and none missing."""
    file = find_attention_file(Path(path))
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (pickle and torch raise many types; "Weights only load failed" is a page)
            what = "holds objects other than tensors" if "weights only" in str(err).lower() else "is not readable"
            raise UserError(f"--weights: {file} {what} (expected tensors only: safetensors or torch.save of a "
                            "state dict)") from None  # fmt: skip
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights: {file}: expected a mapping of tensor names to tensors")
    expected = catvton_state_dict(unet)
    missing = sorted(set(expected) - set(state), key=_key_order)
    unused = sorted(set(state) - set(expected), key=_key_order)
    if missing or unused:
        raise UserError(
            f"{file}: not CatVTON attention weights for this UNet: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unused)} unused (e.g. {unused[:2]})"
        )
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise UserError(
            f"{file}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}"
        )
    for r, (_, module) in enumerate(attn1_modules(unet)):
        for name in ATTN1_PARAMS:
            p = module.get_parameter(name)
            p.data.copy_(state[f"{CATVTON_STRIDE * r}.{name}"].to(p.dtype))


def save_catvton_attention(unet: torch.nn.Module, folder: Path) -> Path:
    """Write `folder/attention/model.safetensors` in CatVTON's layout, atomically."""
    from safetensors.torch import save_file

    from diffbase.io import atomic_write

    state = catvton_state_dict(unet)
    return atomic_write(folder / "attention" / "model.safetensors", lambda p: save_file(state, str(p)))


def _key_order(key: str) -> tuple[int, str]:
    head, _, rest = key.partition(".")
    return (int(head), rest) if head.isdigit() else (1 << 30, key)
