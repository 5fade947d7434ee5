"""Validation during training: images from fixed prompts and seeds (a grid PNG per check), and the
loss on a held-out split at fixed noise levels, comparable from check to check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.data.buckets import largest_resolution
from diffbase.errors import UserError
from diffbase.models import backbone as B
from diffbase.models.placement import encoders_on


def control_images(config: Config, dataset: Any, count: int) -> list[Any]:
    """The control images for ControlNet validation: from the config, else the first training ones."""
    from diffbase.data.images import BadFile, load_image

    paths = [Path(p) for p in config.training.validation.control_images]
    if not paths:
        paths = [r.control for r in dataset.records if r.control is not None][:count]
    if not paths:
        raise UserError("training.validation.control_images: needed for ControlNet validation images")
    try:
        return [load_image(paths[i % len(paths)]) for i in range(count)]
    except BadFile as err:
        raise UserError(f"training.validation.control_images: {err.path}: {err.reason}") from None


@torch.no_grad()
def validation_images(config: Config, bb: B.Backbone, dataset: Any) -> tuple[Any, list[Any]]:
    """One row (the grid, and its images): an image per validation prompt, each with its own fixed seed."""
    from diffbase.generate import GenerateSettings, pipeline_kwargs
    from diffbase.grid import image_grid

    v = config.training.validation
    side = largest_resolution(config.data)
    h, w = v.size or (side, side)
    pipe, extra = bb.pipe, [{} for _ in v.prompts]
    if bb.controlnet is not None:
        import diffusers

        support = B.controlnet_support(bb.family).controlnet
        pipe = getattr(diffusers, support.pipeline).from_pipe(bb.pipe, controlnet=bb.controlnet)
        extra = [{support.image_arg: img.resize((w, h))} for img in control_images(config, dataset, len(v.prompts))]
    pipe.set_progress_bar_config(disable=True)
    denoiser = bb.denoiser
    was_training = denoiser.training
    denoiser.eval()
    if bb.controlnet is not None:
        bb.controlnet.eval()
    images = []
    with encoders_on(bb):
        for i, prompt in enumerate(v.prompts):
            s = GenerateSettings(prompt=prompt, seed=v.seed + i, steps=v.steps, guidance=v.guidance, height=h, width=w)
            kwargs = pipeline_kwargs(bb.spec, s) | extra[i] | B.text_length(bb.pipe, bb.family)
            images.append(pipe(**kwargs, output_type="pil").images[0])
    denoiser.train(was_training)
    if bb.controlnet is not None:
        bb.controlnet.train(was_training)
    return image_grid(
        [images], header=list(v.prompts), cell=max(128, min(256, max(h, w)))
    ), images  # captions need room


@torch.no_grad()
def validation_loss(
    config: Config,
    bb: B.Backbone,
    dataset: Any,
    cache: Any | None = None,
    keep: tuple[str, ...] = (),
    guide: B.Guide | None = None,
) -> float:
    """Mean loss over the held-out split at the configured fixed noise levels and fixed noise (`keep`, `guide`:
    as the method's loss has them)."""
    from diffbase.training.loop import encode_batch, read_batch
    from diffbase.training.step import fixed_time_loss

    t = config.training
    total, count = 0.0, 0
    for indices in dataset.sampler(1, shuffle=False):
        batch = read_batch(dataset, indices)
        if not batch["index"]:
            continue
        encoded, cond = encode_batch(bb, batch, cache, keep)
        loss = fixed_time_loss(
            bb,
            t.objective,
            encoded,
            cond,
            t.validation.loss_timesteps,
            seed=config.experiment.seed,
            guide=guide,
        )
        total += loss * len(batch["index"])
        count += len(batch["index"])
    return total / max(count, 1)


REFERENCE_IMAGES = 64  # training images FID / KID compare the validation images with


def check_metrics(config: Config) -> None:
    """training.validation.metrics' networks exist and there are images to compare, before anything loads."""
    from diffbase.metrics.features import parse

    v = config.training.validation
    if not v.metrics:
        return
    if not v.prompts:
        raise UserError(
            "training.validation.metrics: computed on the validation images; set training.validation.prompts"
        )
    if "clip_t" in v.metrics and not (v.clip and Path(v.clip).is_dir()):
        raise UserError(f"training.validation.clip: {v.clip}: not a folder (a local CLIP model for clip_t)")
    if {"fid", "kid"} & set(v.metrics):
        if not v.features:
            raise UserError("training.validation.features: needed for fid / kid (dino:DIR, clip:DIR or inception:FILE)")
        kind, path = parse(v.features, "training.validation.features")
        if not Path(path).exists():
            raise UserError(f"training.validation.features: {path}: not found (the {kind} network for fid / kid)")
        if len(v.prompts) < 2:
            raise UserError("training.validation.prompts: fid / kid need at least 2 validation images (prompts)")


def image_metrics(config: Config, images: list[Any], prompts: list[str], dataset: Any) -> dict[str, float]:
    """training.validation.metrics of the validation images: val_clip_t against their prompts, val_fid / val_kid
    against the first training images (few images: a trend from check to check, not a paper's number)."""
    from diffbase.metrics import features, scores
    from diffbase.metrics.images import read, to_tensor

    v = config.training.validation
    if not v.metrics or not images:
        return {}
    fakes = [to_tensor(image) for image in images]
    out: dict[str, float] = {}
    if "clip_t" in v.metrics:
        values = scores.clip_scores(*cached(f"clip-scores:{v.clip}", lambda: features.clip_for_scores(v.clip)),
                                    fakes, prompts)  # fmt: skip
        out["val_clip_t"] = sum(values) / len(values)
    if {"fid", "kid"} & set(v.metrics):
        net = cached(v.features, lambda: features.load(v.features, "training.validation.features"))
        reals = read([r.image for r in dataset.records[:REFERENCE_IMAGES]])
        found = scores.distribution(net, reals, fakes, "training.validation.metrics")
        out |= {f"val_{k}": found[k] for k in ("fid", "kid") if k in v.metrics}
    return out


_NETS: dict[str, Any] = {}


def cached(key: str, make: Any) -> Any:
    """A feature network loaded once per process (validation runs many times)."""
    if key not in _NETS:
        _NETS[key] = make()
    return _NETS[key]
