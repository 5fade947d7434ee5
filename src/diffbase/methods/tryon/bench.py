"""The try-on benchmark stage: CatVTON (SD1.5-size UNet, 9 input channels) at 1024x768, 50 DDIM steps."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffbase.config import configs_dir, load_config
from diffbase.interface.bench import Context, Stage, timed


@dataclass(frozen=True)
class Sizes:
    model: str
    overrides: tuple[str, ...]
    hw: tuple[int, int]
    steps: int


SIZES = {
    False: Sizes("experiments/tryon_catvton_sd15.yaml", (), (1024, 768), 50),
    True: Sizes("models/sd15_tiny.yaml", ("model.unet.in_channels=9", "training.tryon.variant=catvton"), (64, 48), 3),
}


def stage_tryon(ctx: Context) -> None:
    """CatVTON sampling at the size users run it: one image's seconds."""
    from diffbase.methods.tryon.mechanism.sampling import TryOnSettings, tryon
    from diffbase.methods.tryon.mechanism.vton import prepare_unet
    from diffbase.models.backbone import Backbone
    from diffbase.models.build import build_pipeline
    from diffbase.models.specs import spec_for

    s, common = SIZES[ctx.tiny], ctx.sizes
    config = load_config(configs_dir() / s.model, [*s.overrides, "model.dtype=bfloat16", "model.random_weights=true"])
    v = config.training.tryon
    ctx.log("tryon: building the SD1.5 UNet (9 input channels)")
    with torch.device(ctx.device):
        pipe = build_pipeline(config.model, seed=0)
    prepare_unet(pipe.unet, v.variant)
    pipe.unet.eval()
    bb = Backbone(spec_for(config.model.family, config.model.variant), pipe)
    h, w = s.hw
    g = torch.Generator().manual_seed(0)
    person = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    garment = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 5 : 3 * h // 5, w // 5 : 4 * w // 5] = 1
    settings = TryOnSettings(steps=s.steps, guidance=2.5, eta=v.eta)
    ctx.log("tryon: warm-up")
    tryon(bb, v.variant, person, garment, mask, replace(settings, steps=common.sample_warmup_steps))
    ctx.log("tryon: timing")
    seconds = timed(lambda: tryon(bb, v.variant, person, garment, mask, settings), ctx.device)
    ctx.add(
        "tryon",
        f"CatVTON ({v.variant}) try-on, SD1.5-size UNet, {h}x{w} person ({2 * h}x{w} canvas), "
        f"{s.steps} DDIM steps, guidance 2.5: s/image",
        f"{seconds:.2f}",
    )


STAGES = (Stage("tryon", stage_tryon),)
