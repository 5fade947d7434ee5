"""DINOv2 features of each tile and the trainable adapter that brings them into FLUX.

The features are the last hidden states (CLS and patch tokens) of a transformers `Dinov2Model` loaded from a
local folder, for the tile's pixels resized to `side` (a multiple of the patch size; 224 for ViT-B/14). Two
ways in (`training.upscale.dino_injection`, recorded in the adapter file):

- `tokens`: the adapter maps every feature token to the width of the text tokens (FLUX.1: 4096, T5's), so
  they join the prompt's tokens as extra context; `dino_strength` s scales the attention every query gives
  them (an additive log(s) on their attention logits: the softmax mass they would get is multiplied by s
  before renormalising).
- `aligned`: the adapter maps the patch tokens to the transformer's own width (FLUX.1: 3072); on their
  g x g grid, which covers the tile, they are resized bilinearly to the tile's packed latent grid
  (`align_to_latent`) and added to the image tokens right after `x_embedder`, each latent token getting the
  features of the pixels it covers; s scales what is added.

At strength 0 they are left out entirely, which is exactly plain img2img.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INJECTIONS = ("tokens", "aligned")  # extra context tokens | added to the latent tokens, spatially aligned


def load_dino(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A transformers Dinov2Model from a local folder; anything else is a one-line error."""
    from transformers import Dinov2Model

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"--dino: {folder} has no config.json (expected a local DINOv2 folder, e.g. dinov2-base)")
    try:
        kind = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"--dino: {config_file}: not JSON ({err.msg})") from None
    if kind != "dinov2":
        raise UserError(f"--dino: {folder} holds a '{kind}' model; expected a DINOv2 model (model_type dinov2)")
    model = Dinov2Model.from_pretrained(folder, local_files_only=True)
    return model.to(device, dtype).eval().requires_grad_(False)


def dino_side(dino: Any, side: int | None = None) -> int:
    """The input side for the features: `side` or the model's image size, as a multiple of its patch size."""
    patch = dino.config.patch_size
    wanted = side or min(int(dino.config.image_size), 224)
    return max(patch, wanted // patch * patch)


@torch.no_grad()
def dino_features(dino: Any, pixels: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1 + patches, hidden)."""
    s = dino_side(dino, side)
    x = torch.nn.functional.interpolate(pixels.float(), size=(s, s), mode="bicubic", align_corners=False)
    x = (x + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(dino.device, dino.dtype)
    return dino(pixel_values=x).last_hidden_state


class DinoAdapter(torch.nn.Module):
    """DINOv2 features -> context tokens (`tokens`) or additions to the image tokens (`aligned`): LayerNorm,
    Linear, GELU, Linear (the last one starts at zero)."""

    def __init__(self, dino_width: int, context_width: int, hidden: int | None = None,
                 injection: str = "tokens") -> None:  # fmt: skip
        super().__init__()
        if injection not in INJECTIONS:
            raise UserError(f"dino_injection: expected one of {', '.join(INJECTIONS)}, got {injection!r}")
        hidden = hidden or context_width
        self.injection = injection
        self.dims = {"dino_width": dino_width, "context_width": context_width, "hidden": hidden}
        self.net = torch.nn.Sequential(
            torch.nn.LayerNorm(dino_width),
            torch.nn.Linear(dino_width, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, context_width),
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def save(self, path: Path) -> Path:
        from diffbase.models.lora_formats import save_lora

        meta = {k: str(v) for k, v in self.dims.items()} | {"injection": self.injection}
        return save_lora({k: v for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, widths: dict[str, int], dino_width: int) -> DinoAdapter:
        """The adapter in `path`, its injection read from the file (files without one are `tokens`); `widths`:
        the width each injection needs on this FLUX model (`adapter_widths`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--adapter: {path}: no such file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
            raise UserError(f"--adapter: {path}: not a safetensors file ({str(err).splitlines()[0]})") from None
        injection = meta.get("injection", "tokens")
        if injection not in INJECTIONS:
            raise UserError(f"--adapter: {path} records injection {injection!r}; expected one of "
                            f"{', '.join(INJECTIONS)}")  # fmt: skip
        dims = {k: int(meta[k]) for k in ("dino_width", "context_width", "hidden") if k in meta}
        if "dino_width" not in dims or "context_width" not in dims:  # another kind of file (a LoRA, say)
            raise UserError(f"--adapter: {path} is not a DINO adapter (its metadata has no dino_width / context_width); "
                            "expected one written by `diffbase train` with training.method: upscale")  # fmt: skip
        if dims.get("dino_width") != dino_width or dims.get("context_width") != widths[injection]:
            raise UserError(f"--adapter: {path} maps {dims.get('dino_width')} -> {dims.get('context_width')} features "
                            f"({injection}); this DINO model and FLUX model need {dino_width} -> "
                            f"{widths[injection]}")  # fmt: skip
        adapter = cls(dino_width, widths[injection], dims.get("hidden"), injection)
        adapter.load_state_dict(state)
        return adapter


def adapter_widths(transformer_config: Any) -> dict[str, int]:
    """The adapter's output width per injection: the text tokens' (`joint_attention_dim`) for `tokens`, the
    image tokens' after `x_embedder` (heads x head width) for `aligned`."""
    c = transformer_config
    return {"tokens": int(c.joint_attention_dim), "aligned": int(c.num_attention_heads * c.attention_head_dim)}


def align_to_latent(tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, leading + g*g, C) feature tokens (CLS, any registers, then the g x g patches row by row) -> (B, h*w, C)
    on the (h, w) packed latent grid of the same tile, in FLUX's packed order (row by row). Both grids cover
    the whole tile, so bilinear resizing with cell centres matched (align_corners=False) puts each latent
    token at the features of the pixels it covers."""
    b, n, c = tokens.shape
    g = math.isqrt(n - 1)
    if g < 1:
        raise ValueError(f"align_to_latent: {n} tokens hold no square patch grid")
    grid = tokens[:, n - g * g :].transpose(1, 2).reshape(b, c, g, g)
    resized = torch.nn.functional.interpolate(grid.float(), size=grid_hw, mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)


@contextlib.contextmanager
def added_to_image_tokens(transformer: torch.nn.Module, added: torch.Tensor | None) -> Iterator[None]:
    """Adds `added` (B or 1, image tokens, width) to the image tokens after the transformer's `x_embedder`
    while the block runs. None: nothing is added."""
    if added is None:
        yield
        return

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + added.to(output.device, output.dtype)

    handle = transformer.x_embedder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def context_with_dino(
    prompt_embeds: torch.Tensor, text_ids: torch.Tensor, tokens: torch.Tensor, strength: float, image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The prompt's tokens followed by the DINO tokens, their ids (zeros, as text), and the joint attention's
    additive mask that scales the DINO tokens' attention by `strength` (keys: [text, dino, image])."""
    b, n = tokens.shape[0], tokens.shape[1]
    embeds = torch.cat([prompt_embeds.expand(b, -1, -1), tokens.to(prompt_embeds.dtype)], dim=1)
    ids = torch.cat([text_ids, text_ids.new_zeros(n, text_ids.shape[-1])], dim=0)
    text = prompt_embeds.shape[1]
    bias = torch.zeros(b, 1, 1, text + n + image_tokens, device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    bias[..., text : text + n] = math.log(strength)
    return embeds, ids, {"attention_mask": bias}
