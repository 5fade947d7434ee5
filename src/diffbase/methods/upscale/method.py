"""The DINO adapter of the tiled upscaler (`training.method: upscale`): FLUX.1 frozen, only the adapter
trains. From any image folder, each crop (`data.resolution`, ideally the model's native size: a tile) is the
high-res target and its degraded copy (diffbase.methods.upscale.mechanism.degrade) the low-res input; the DINOv2 features of
the low-res copy enter through the adapter (`dino_injection`: as extra context tokens of the joint attention,
or aligned to the latent grid and added to the image tokens), and the loss is flow matching on the
high-res latent at noise levels up to `max_sigma` (upscaling starts from the low-res latent at strength
<= max_sigma, so higher noise is never seen). Validation: the held-out loss with the adapter on and off at
fixed noise levels and noise, and a grid low-res | upscaled (adapter on) | high-res.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.models import backbone as B
from diffbase.models import families
from diffbase.training.metrics import PAIRED_METRICS
from diffbase.training.objectives import diffusion_loss, sample_flow_sigmas
from diffbase.training.step import sample_generator
from diffbase.training.validation import paired_metrics


@dataclass
class UpscaleConfig:
    dino_path: str | None = None  # a local transformers DINOv2 folder (dinov2-base: ViT-B/14, 768 wide)
    dino_side: int = 224  # the features' input side (a multiple of the patch size)
    # aligned: resized to the latent grid, added to the image tokens; tokens: extra context tokens (recorded in
    # the export). aligned is the default: lower held-out loss and seams on the toy (benchmarks/RESULTS.md)
    dino_injection: Literal["tokens", "aligned"] = "aligned"
    max_sigma: float = 0.6
    scales: list[float] = field(default_factory=lambda: [2.0, 4.0])
    blur: list[float] = field(default_factory=lambda: [0.0, 1.5])
    noise: list[float] = field(default_factory=lambda: [0.0, 0.03])
    jpeg: list[int] = field(default_factory=lambda: [40, 95])
    validation_sigmas: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    validation_images: int = 4
    validation_strength: float = 0.35  # the grid's img2img strength (the command's default)


def degradation(config: Config) -> Any:
    from diffbase.methods.upscale.mechanism.degrade import Degradation

    u = config.training.upscale
    return Degradation(list(u.scales), list(u.blur), list(u.noise), [int(q) for q in u.jpeg])


def prepare(bb: Any, config: Config) -> Trained:
    from diffbase.methods.upscale.mechanism.dino import DinoAdapter, adapter_widths, load_dino

    families.require(bb.family, "flux1", f"training.method: upscale trains on FLUX.1, not {bb.family}")
    u = config.training.upscale
    if not u.dino_path:
        raise UserError("training.upscale.dino_path: required, a local DINOv2 folder")
    text_to_image.freeze(bb)
    dino = load_dino(u.dino_path, bb.device)
    width = adapter_widths(bb.denoiser.config)[u.dino_injection]
    adapter = DinoAdapter(dino.config.hidden_size, width, injection=u.dino_injection).to(bb.device)
    return Trained({"adapter": adapter}, list(adapter.parameters()), extras={"dino": dino})


def low_res(config: Config, batch: dict[str, Any], step: int) -> torch.Tensor:
    from diffbase.methods.upscale.mechanism.degrade import degrade_batch

    rngs = [random.Random(config.experiment.seed * 1_000_003 + step * 10_007 + i) for i in batch["index"]]
    return degrade_batch(batch["pixels"], degradation(config), rngs)


def predict(config: Config, bb: Any, trained: Trained, x0: torch.Tensor, lr: torch.Tensor, captions: list[str],
            sigma: torch.Tensor, noise: torch.Tensor, adapter_on: bool = True) -> torch.Tensor:  # fmt: skip
    """The velocity for x0 noised to sigma, with the low-res copy's DINO tokens when `adapter_on`."""
    from diffbase.methods.upscale.mechanism.dino import align_to_latent, context_with_dino, dino_features
    from diffbase.methods.upscale.mechanism.sampling import velocity

    cond = B.encode_prompts(bb, captions)
    embeds, text_ids = cond["prompt_embeds"], cond["text_ids"]
    context: tuple = (embeds, text_ids, None)
    if adapter_on:
        features = dino_features(trained.extras["dino"], lr.to(bb.device), config.training.upscale.dino_side)
        tokens = trained.call("adapter")(features.float())
        grid = (x0.shape[-2] // 2, x0.shape[-1] // 2)
        if config.training.upscale.dino_injection == "aligned":
            context = (embeds, text_ids, None, align_to_latent(tokens, grid))
        else:
            context = context_with_dino(embeds, text_ids, tokens, 1.0, grid[0] * grid[1])
    guidance = (
        torch.full([1], config.training.objective.guidance, device=bb.device)
        if bb.denoiser.config.guidance_embeds
        else None
    )
    noisy = B.add_noise(bb, x0, noise, sigma).to(bb.denoiser.dtype)
    timestep = B.model_timesteps(bb, sigma).to(bb.device, noisy.dtype)
    return velocity(bb.pipe, noisy, timestep, cond["pooled_prompt_embeds"], context, guidance)


def loss(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    u = config.training.upscale
    gens = [sample_generator(config.experiment.seed, step, i) for i in batch["index"]]
    with torch.no_grad():
        x0 = B.encode_images(bb, batch["pixels"].to(bb.device), sample=False)
    seq_len = B.image_seq_len(bb, tuple(x0.shape[-2:]))
    sigma = torch.cat(
        [
            sample_flow_sigmas(config.training.objective, 1, dict(bb.pipe.scheduler.config), seq_len, generator=g)
            for g in gens
        ]
    )
    sigma = sigma * u.max_sigma
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
    pred = predict(config, bb, trained, x0, low_res(config, batch, step), batch["caption"], sigma, noise)
    return diffusion_loss(pred, B.target(bb, x0, noise, sigma)), {}


@torch.no_grad()
def held_out_loss(config: Config, bb: Any, trained: Trained, held_out: Any, adapter_on: bool) -> float:
    """The flow loss over held-out crops at `validation_sigmas`, fixed degradations and noise."""
    from diffbase.training.loop import read_batch

    values = []
    for i in range(len(held_out)):
        batch = read_batch(held_out, [i])
        if not batch["index"]:
            continue
        x0 = B.encode_images(bb, batch["pixels"].to(bb.device), sample=False)
        lr = low_res(config, batch, 10**6)
        for j, s in enumerate(config.training.upscale.validation_sigmas):
            g = torch.Generator().manual_seed(config.experiment.seed * 1000 + i * 10 + j)
            noise = torch.randn(x0.shape, generator=g).to(x0)
            sigma = torch.tensor([float(s)])
            pred = predict(config, bb, trained, x0, lr, batch["caption"], sigma, noise, adapter_on)
            values.append(float(diffusion_loss(pred.float(), B.target(bb, x0, noise, sigma).float())))
    return sum(values) / max(len(values), 1)


def validate(config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]) -> Validation:
    from diffbase.data.datasets import to_pil
    from diffbase.grid import image_grid
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, upscale
    from diffbase.training.loop import read_batch

    held_out, _ = validation
    if held_out is None:
        return Validation()
    u, v = config.training.upscale, config.training.validation
    metrics = {"val_loss": held_out_loss(config, bb, trained, held_out, True),
               "val_loss_adapter_off": held_out_loss(config, bb, trained, held_out, False)}  # fmt: skip
    rows = []
    adapter, dino = trained.modules["adapter"], trained.extras["dino"]
    for i in range(min(u.validation_images, len(held_out))):
        batch = read_batch(held_out, [i])
        if not batch["index"]:
            continue
        hr = to_pil(batch["pixels"][0])
        small = hr.resize((hr.width // 2, hr.height // 2), Image.BICUBIC)
        settings = UpscaleSettings(
            scale=2.0, strength=u.validation_strength, steps=v.steps, seed=v.seed, prompt=batch["caption"][0]
        )
        rows.append([small.resize(hr.size, Image.NEAREST), upscale(bb.pipe, small, settings, dino, adapter), hr])
    grid = image_grid(rows, header=["low-res (x2 nearest)", "upscaled x2", "high-res"]) if rows else None
    return Validation(grid, metrics | paired_metrics(config, [r[1] for r in rows], [r[2] for r in rows]))


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    return text_to_image.dataset(config, held_out, bb)


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    adapter = trained.modules["adapter"]
    return {"adapter": str(adapter.save(out_dir / "upscale" / "dino_adapter.safetensors"))}


def load(model: str, dino: str | None = None, adapter: str | None = None, **runtime: Any) -> tuple[Any, Any, Any]:
    """(FLUX.1 pipeline, DINOv2 model or None, adapter or None) for `run`."""
    from diffbase.methods.upscale.mechanism.dino import DinoAdapter, adapter_widths, load_dino
    from diffbase.models.loading import load_pipeline
    from diffbase.models.placement import execution_device

    if (dino is None) != (adapter is None):
        raise UserError("--dino and --adapter: give both (the adapter is trained for one DINO model) or neither")
    pipe, spec = load_pipeline(model, **runtime)
    families.require(
        spec.pipeline,
        "FluxPipeline",
        f"--model: the upscaler runs a FLUX.1 text-to-image folder; {model} holds a {spec.pipeline}",
    )
    pipe.set_progress_bar_config(disable=True)
    if dino is None:
        return pipe, None, None
    device, dtype = execution_device(pipe), pipe.transformer.dtype
    model_d = load_dino(dino, device, dtype)
    ada = DinoAdapter.load(adapter, adapter_widths(pipe.transformer.config), model_d.config.hidden_size)
    return pipe, model_d, ada.to(device, dtype)


def run(loaded: tuple[Any, Any, Any], inputs: dict[str, Any], settings: Any) -> Any:
    from diffbase.methods.upscale.mechanism.sampling import upscale

    pipe, dino, adapter = loaded
    return upscale(pipe, inputs["image"], settings, dino, adapter, show_progress=inputs.get("progress"))


UPSCALE = register(
    Method(
        name="upscale",
        aliases=("upscale_dino",),
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=dataset,
        validate=validate,
        metrics=PAIRED_METRICS,
        section=("upscale", UpscaleConfig),
        cacheable=False,
        load=load,
        run=run,
        describe="the tiled upscaler's DINO adapter (FLUX.1 frozen)",
    )
)


def vae_factor(model: str) -> int:
    """The VAE's downsampling factor from its config (2 ** (levels - 1)), read before any weights load."""
    import json

    config = Path(model) / "vae" / "config.json"
    try:
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"--model: {config} is missing or unreadable; expected a local FLUX.1 diffusers folder"
        ) from None
