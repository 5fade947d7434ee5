"""DreamFit generation in its three modes: one write pass on the reference (garment, or a pose or
keep image beside the garment) before the first step, then FLUX.1's own sampling with every step
reading the banks; the banks are freed afterwards.

Reference text per mode and the side-by-side layouts follow the official code (REFERENCES.md).
With true CFG (`true_cfg` > 1; the released configs never reach it, as it starts after their
last step) a second write pass on a black image with an empty prompt fills the negative branch's
banks, and every negative transformer call reads those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from diffbase.errors import UserError
from diffbase.methods.dreamfit.mechanism.passes import BankState, write_banks
from diffbase.models.placement import execution_device

GARMENT_TEXT = {
    "garment": "cloth",
    "pose": "Two reference image. [IMAGE1] pose. [IMAGE2] cloth.",
    "tryon": "Two reference image. [IMAGE1] keep image and pose. [IMAGE2] cloth.",
}


@dataclass
class DreamFitSettings:
    prompt: str
    mode: str = "garment"
    steps: int = 50
    guidance: float = 4.0
    seed: int = 0
    height: int = 1024
    width: int = 768
    true_cfg: float = 1.0  # > 1: true classifier-free guidance with the negative write pass


def keep_image(person: Image.Image, mask: Image.Image, pose: Image.Image | None) -> Image.Image:
    """The try-on mode's first reference: the person with the garment area blacked out and the
    skeleton drawn on top (the official code for it was never released)."""
    keep = Image.composite(Image.new("RGB", person.size, 0), person, mask.convert("L").resize(person.size))
    if pose is not None:
        pose = pose.convert("RGB").resize(person.size)
        keep = Image.composite(pose, keep, pose.convert("L").point(lambda v: 255 if v > 40 else 0))
    return keep


def reference_image(
    mode: str, garment: Image.Image, size: tuple[int, int], first: Image.Image | None = None
) -> Image.Image:
    """The write pass's image: the garment alone, or [pose | garment] / [keep | garment] side by side."""
    w, h = size
    if mode == "garment":
        return garment.convert("RGB").resize((w, h), Image.BICUBIC)
    if first is None:
        raise UserError(f"--mode {mode}: needs {'--pose' if mode == 'pose' else '--person and --mask'}")
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(first.convert("RGB").resize((w, h), Image.BICUBIC), (0, 0))
    canvas.paste(garment.convert("RGB").resize((w, h), Image.BICUBIC), (w, 0))
    return canvas


@torch.no_grad()
def alternate_banks(transformer: Any, state: BankState) -> Any:
    """True CFG: the pipeline calls the transformer for the prompt, then the negative, each step; the reads
    alternate between the garment's banks and the negative's. Returns the hook (remove it after)."""
    calls = [0]

    def alternate(module: Any, args: Any) -> None:
        state.reading_negative = calls[0] % 2 == 1
        calls[0] += 1

    return transformer.register_forward_pre_hook(alternate)


def dreamfit_generate(pipe: Any, state: BankState, settings: DreamFitSettings, reference: Image.Image) -> Image.Image:
    """One image: the write pass on `reference` with the mode's text, then FLUX.1 sampling that reads."""
    from diffbase.data.datasets import to_tensor
    from diffbase.models.backbone import Backbone, encode_images, image_ids, pack, text_length
    from diffbase.models.specs import spec_for

    if settings.mode not in GARMENT_TEXT:
        raise UserError(f"--mode: expected one of {sorted(GARMENT_TEXT)}, got '{settings.mode}'")
    transformer, device = pipe.transformer, execution_device(pipe)
    bb = Backbone(spec_for("flux1"), pipe)
    length = text_length(pipe, "flux1")
    guidance = torch.full([1], settings.guidance, device=device) if transformer.config.guidance_embeds else None

    def write(text: str, image: Image.Image, negative: bool) -> None:
        # the text is padded like the prompt: single-block reads reuse the prompt's text ids
        embeds, pooled, text_ids = pipe.encode_prompt(text, None, device=device, **length)
        z = encode_images(bb, to_tensor(image)[None].to(device), sample=False).to(transformer.dtype)
        packed, ids = pack(bb, z), image_ids(bb, z)
        write_banks(
            transformer,
            state,
            negative=negative,
            hidden_states=packed,
            timestep=torch.zeros(1, device=device),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )

    write(GARMENT_TEXT[settings.mode], reference, negative=False)
    extra: dict[str, Any] = {}
    hook = None
    if settings.true_cfg > 1:
        write("", Image.new("RGB", reference.size, (0, 0, 0)), negative=True)
        hook = alternate_banks(transformer, state)
        extra = {"true_cfg_scale": settings.true_cfg, "negative_prompt": ""}
    try:
        return pipe(
            prompt=settings.prompt,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=torch.Generator("cpu").manual_seed(settings.seed),
            **length,
            **extra,
        ).images[0]
    finally:
        if hook is not None:
            hook.remove()
        state.clear()  # the banks are freed after each generation
        state.mode = "off"
