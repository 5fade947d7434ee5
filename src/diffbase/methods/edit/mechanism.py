"""Reference editing (FLUX.1 Kontext, FLUX.2 dev and klein with reference images) and inpainting
(FLUX.1 Fill, FLUX.2 klein inpainting) through diffusers' own pipelines, so a seed gives the same
pixels as the bare pipeline. The checks in front of them turn bad input into one-line errors.

The conditioning the training methods build themselves (`prepare_kontext_conditioning`,
`prepare_fill_conditioning`) is what these pipelines feed their transformers (tests/test_editing.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.models import backbone as B
from diffbase.models.specs import FamilySpec

# pipeline -> the most reference images it takes (FLUX.1 Kontext: one; FLUX.2: BFL's stated 10)
EDIT_PIPELINES = {"FluxKontextPipeline": 1, "Flux2Pipeline": 10, "Flux2KleinPipeline": 10}
INPAINT_PIPELINES = {"FluxFillPipeline": 0, "Flux2KleinInpaintPipeline": 10}  # -> reference images it takes


@dataclass
class EditSettings:
    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float | None = None
    height: int | None = None  # None: the pipeline's own choice (from the reference image)
    width: int | None = None
    strength: float = 1.0  # inpainting only: 1.0 repaints the masked area from pure noise
    keep_size: bool = False  # Kontext: the reference at height x width, not resized to Kontext's preferred sizes


def check_pipeline(spec: FamilySpec, kind: str, model: str) -> None:
    """The folder's pipeline does this kind of job (`edit` or `inpaint`)."""
    table = EDIT_PIPELINES if kind == "edit" else INPAINT_PIPELINES
    if spec.pipeline not in table:
        other = "inpaint" if kind == "edit" else "edit"
        hint = f"; it is a `diffbase {other}` model" if spec.pipeline in (INPAINT_PIPELINES | EDIT_PIPELINES) else ""
        raise UserError(f"--model: {model} holds a {spec.pipeline}, which does not {kind}; expected one of "
                        f"{sorted(table)}{hint}")  # fmt: skip


def check_references(spec: FamilySpec, kind: str, count: int) -> None:
    most = (EDIT_PIPELINES if kind == "edit" else INPAINT_PIPELINES)[spec.pipeline]
    if count > most:
        raise UserError(f"--image: {spec.pipeline} takes at most {most} reference image(s), got {count}"
                        if kind == "edit" else
                        f"--reference: {spec.pipeline} takes at most {most} reference image(s), got {count}")  # fmt: skip
    if kind == "edit" and count == 0:
        raise UserError("--image: give at least one reference image to edit")


def check_images(pipe: Any, images: list[Any], names: list[str]) -> None:
    """The pipeline's own limits on reference images (FLUX.2: at least 64 px a side, a bounded aspect
    ratio) as one-line errors naming the file."""
    check = getattr(getattr(pipe, "image_processor", None), "check_image_input", None)
    if check is None:
        return
    for image, name in zip(images, names, strict=True):
        try:
            check(image)
        except ValueError as err:
            raise UserError(f"{name}: {err}") from None


def call_kwargs(settings: EditSettings) -> dict[str, Any]:
    from diffbase.generate import seeded_kwargs

    kwargs = seeded_kwargs(settings.prompt, settings.steps, settings.seed, settings.guidance)
    if settings.height is not None:
        kwargs["height"], kwargs["width"] = settings.height, settings.width
    return kwargs


def edit(pipe: Any, spec: FamilySpec, images: list[Any], settings: EditSettings) -> Any:
    """One edited PIL image from reference images and a prompt."""
    check_references(spec, "edit", len(images))
    kontext = spec.pipeline == "FluxKontextPipeline"
    kwargs = call_kwargs(settings)
    if kontext and settings.height is not None:  # Kontext rescales any size to `max_area` (1024^2) otherwise
        kwargs["max_area"] = settings.height * settings.width
    if kontext and settings.keep_size:
        kwargs["_auto_resize"] = False
    with torch.inference_mode():
        out = pipe(
            image=images[0] if kontext else images, **kwargs, **B.text_length(pipe, spec.family), output_type="pil"
        )
    return out.images[0]


def inpaint(pipe: Any, spec: FamilySpec, image: Any, mask: Any, settings: EditSettings,
            references: list[Any] | None = None) -> Any:  # fmt: skip
    """One PIL image: `image` repainted where `mask` is white (FLUX.2 klein may also take references)."""
    check_references(spec, "inpaint", len(references or []))
    kwargs = call_kwargs(settings) | {"image": image, "mask_image": mask, "strength": settings.strength}
    if settings.height is None:  # the image's own size, as the Fill pipeline would round it
        kwargs["height"], kwargs["width"] = image.size[1], image.size[0]
    if references:
        kwargs["image_reference"] = references
    with torch.inference_mode():
        return pipe(**kwargs, **B.text_length(pipe, spec.family), output_type="pil").images[0]


def metadata(settings: EditSettings, model: str, spec: FamilySpec, pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What made the image, with the guidance the pipeline used when the settings left it unset."""
    import inspect

    data = {k: v for k, v in asdict(settings).items() if v is not None}
    if settings.guidance is None:
        default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
        if default is not None and default.default is not inspect.Parameter.empty:
            data["guidance"] = default.default
    return data | inputs | {"model": str(model), "pipeline": spec.pipeline, "family": spec.family}


# --------------------------------------------------------------------------- conditioning for training


def _encode(
    backbone: Any, pixels: torch.Tensor, device: Any, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Normalised VAE latents: the posterior's mean (as the Kontext pipelines encode references), or a
    sample drawn with `generator` (as FluxFillPipeline encodes the masked image)."""
    mean, std = B.encode_distribution(backbone, pixels.to(device=device, dtype=backbone.vae.dtype))
    if generator is not None:
        mean = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return B.normalize(backbone, mean).to(dtype)


def prepare_kontext_conditioning(
    reference_images: list[torch.Tensor], backbone: Any, device: Any, dtype: torch.dtype, time_offset: int = 0
) -> B.Conditioning:
    """Reference images (B, 3, H, W) in [-1, 1] as extra tokens after the target's: packed latents with
    the family's reference ids (FLUX.1 Kontext: t = 1, one reference; FLUX.2: t = 10 + 10 * i), the
    output later sliced back to the target. `time_offset` shifts every reference's index."""
    return reference_tokens(backbone, [_encode(backbone, px, device, dtype) for px in reference_images], time_offset)


def reference_tokens(backbone: Any, latents: list[torch.Tensor], time_offset: int = 0) -> B.Conditioning:
    """Normalised reference latents, in order, as packed tokens with the family's reference ids."""
    tokens = [B.pack(backbone, z) for z in latents]
    ids = [B.reference_ids(backbone, z, i + time_offset) for i, z in enumerate(latents)]
    return B.Conditioning(tokens=torch.cat(tokens, dim=1), token_ids=torch.cat(ids, dim=-2))


def prepare_fill_conditioning(
    reference_image: torch.Tensor,
    mask: torch.Tensor,
    backbone: Any,
    device: Any,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> B.Conditioning:
    """FLUX.1 Fill's extra channels: the latent of the image with the masked area set to 0 (mid grey)
    and the mask (B, 1, H, W, 1 = repaint) pixel-unshuffled by the VAE factor, as FluxFillPipeline
    builds them; the denoiser packs them beside the noisy latents (384 input channels). The pipeline
    samples the masked image's posterior with its generator; without `generator`, the mean."""
    m = (mask > 0.5).to(reference_image)
    masked = reference_image * (1 - m)
    latents = _encode(backbone, masked, device, dtype, generator)
    factor = reference_image.shape[-1] // latents.shape[-1]
    unshuffled = torch.nn.functional.pixel_unshuffle(m.to(device=device, dtype=dtype), factor)
    return B.Conditioning(channels=torch.cat([latents, unshuffled], dim=1))
