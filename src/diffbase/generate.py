"""Text-to-image generation through the diffusers pipeline of each family.

Noise comes from `torch.Generator("cpu").manual_seed(seed)`, as in diffusers' own examples, so
a seed gives the same image here and in a bare diffusers pipeline.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.models.families import FAMILIES, get
from diffbase.models.specs import FamilySpec


@dataclass
class GenerateSettings:
    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float | None = None
    height: int = 512
    width: int = 512
    negative: str | None = None
    true_cfg: float | None = None
    loras: list[str] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768) as height, width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size: expected HxW such as 512x512, got '{text}'") from None
    if h <= 0 or w <= 0:
        raise UserError(f"--size: expected positive sizes, got '{text}'")
    return h, w


def flux_timesteps(pipe: Any, steps: int, seq_len: int, device: Any) -> torch.Tensor:
    """FluxPipeline's schedule, set on its scheduler: sigmas linspace(1, 1/steps) shifted for `seq_len` tokens.
    For loops of our own that must sample as the pipeline does (DreamO, the tiled upscaler)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    c = pipe.scheduler.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))  # fmt: skip
    return retrieve_timesteps(pipe.scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)[0]


def flux_guidance(transformer: Any, value: float, device: Any) -> torch.Tensor | None:
    """The guidance input of a guidance-distilled FLUX transformer (dev), None for one without (schnell)."""
    return torch.full([1], value, device=device, dtype=torch.float32) if transformer.config.guidance_embeds else None


def decode_flux(pipe: Any, z: torch.Tensor) -> Any:
    """Unpacked FLUX latents to a PIL image, as FluxPipeline decodes them."""
    z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def seeded_kwargs(prompt: str, steps: int, seed: int, guidance: float | None) -> dict[str, Any]:
    """What every diffusers pipeline call takes: prompt, steps, the seeded CPU generator and the
    guidance scale when one is set (else the pipeline's own default)."""
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def pipeline_kwargs(spec: FamilySpec, s: GenerateSettings) -> dict[str, Any]:
    """The diffusers call arguments for these settings, with the seeded CPU generator."""
    kwargs = seeded_kwargs(s.prompt, s.steps, s.seed, s.guidance) | {"height": s.height, "width": s.width}
    family = get(spec.family)
    if s.negative is not None:
        if not family.negative_prompt:
            raise UserError(f"--negative: the {spec.pipeline} takes no negative prompt")
        if family.true_cfg and not (s.true_cfg and s.true_cfg > 1):
            raise UserError(f"--negative: {family.title} uses a negative prompt only with --true-cfg greater than 1")
        kwargs["negative_prompt"] = s.negative
    if s.true_cfg is not None:
        if not family.true_cfg:
            have = ", ".join(f.title for f in FAMILIES.values() if f.true_cfg)
            raise UserError(f"--true-cfg: only {have} has true CFG; use --guidance for {family.title}")
        kwargs["true_cfg_scale"] = s.true_cfg
    return kwargs


def generate(pipe: Any, spec: FamilySpec, settings: GenerateSettings) -> Any:
    """One PIL image."""
    from diffbase.models.backbone import text_length

    with torch.inference_mode():
        return pipe(**pipeline_kwargs(spec, settings), **text_length(pipe, spec.family), output_type="pil").images[0]


def metadata(settings: GenerateSettings, model: str | Path, spec: FamilySpec, pipe: Any = None) -> dict[str, Any]:
    """What made the image, with the values the pipeline used where the settings left them unset."""
    data = {k: v for k, v in asdict(settings).items() if v not in (None, [])}
    if settings.guidance is None and pipe is not None:
        default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
        if default is not None and default.default is not inspect.Parameter.empty:
            data["guidance"] = default.default
    return data | {"model": str(model), "pipeline": spec.pipeline, "family": spec.family}
