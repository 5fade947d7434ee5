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
from diffbase.training.metrics import PAIRED_METRICS, TEXT_TO_IMAGE_METRICS


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


def check_metrics(config: Config, computed: tuple[str, ...] = TEXT_TO_IMAGE_METRICS) -> None:
    """training.validation.metrics are ones the method computes (`computed`), their networks exist and there
    are images to compare, before anything loads."""
    v = config.training.validation
    if not v.metrics:
        return
    method = config.training.method
    unknown = [m for m in v.metrics if m not in computed]
    if unknown:
        offered = ", ".join(computed) if computed else "none"
        raise UserError(f"training.validation.metrics: {', '.join(unknown)} not computed by training.method {method} "
                        f"(it computes: {offered})")  # fmt: skip
    if set(computed) <= set(TEXT_TO_IMAGE_METRICS) and not v.prompts:
        raise UserError(
            "training.validation.metrics: computed on the validation images; set training.validation.prompts"
        )
    if not set(computed) <= set(TEXT_TO_IMAGE_METRICS) and v.loss_split <= 0:
        raise UserError("training.validation.metrics: computed on held-out items; set training.validation.loss_split "
                        "(the held-out fraction, e.g. 0.1)")  # fmt: skip
    check_networks(v)


def check_size(config: Config) -> None:
    """training.validation.size is [height, width] in the family's multiple, checked before anything loads: the
    pipeline refuses another size only after the run has trained (a traceback, the steps lost)."""
    from diffbase.models import families

    size, multiple = config.training.validation.size, families.get(config.model.family).size_multiple
    rounds = config.model.family.startswith("flux")  # FLUX pipelines round a size down (with a warning), others raise
    if size is not None and (
        len(size) != 2 or any(side < multiple or (side % multiple and not rounds) for side in size)
    ):
        raise UserError(f"training.validation.size: expected [height, width], each a multiple of {multiple} px "
                        f"({config.model.family}), got {size}")  # fmt: skip


def check_networks(v: Any) -> None:
    """The local networks the chosen metrics need."""
    from diffbase.metrics.features import parse

    if {"clip_t", "clip_i"} & set(v.metrics) and not (v.clip and Path(v.clip).is_dir()):
        raise UserError(f"training.validation.clip: {v.clip}: not a folder (a local CLIP model for clip_t / clip_i)")
    if "dino" in v.metrics and not (v.dino and Path(v.dino).is_dir()):
        raise UserError(f"training.validation.dino: {v.dino}: not a folder (a local DINOv2 model for the dino score)")
    if "lpips" in v.metrics:
        from diffbase.metrics.lpips import parse as parse_lpips

        if not v.lpips:
            raise UserError(
                "training.validation.lpips: needed for lpips (NET:FILE, squeeze:/models/squeezenet1_1-b8a52dc0.pth)"
            )
        parse_lpips(v.lpips, "training.validation.lpips")
    if {"fid", "kid"} & set(v.metrics):
        if not v.features:
            raise UserError("training.validation.features: needed for fid / kid (dino:DIR, clip:DIR or inception:FILE)")
        kind, path = parse(v.features, "training.validation.features")
        if not Path(path).exists():
            raise UserError(f"training.validation.features: {path}: not found (the {kind} network for fid / kid)")
        if len(v.prompts) < 2:
            raise UserError("training.validation.prompts: fid / kid need at least 2 validation images (prompts)")


def paired_metrics(config: Config, results: list[Any], targets: list[Any]) -> dict[str, float]:
    """training.validation.metrics of held-out results against their ground truth (PIL images or [0, 1]
    tensors): val_ssim, val_psnr, val_lpips (means over the items)."""
    from diffbase.metrics import scores
    from diffbase.metrics.images import to_tensor

    v = config.training.validation
    chosen = [m for m in PAIRED_METRICS if m in v.metrics]
    if not chosen or not results:
        return {}
    lpips_model = None
    if "lpips" in chosen:
        from diffbase.metrics.lpips import model

        lpips_model = cached(f"lpips:{v.lpips}", lambda: model(v.lpips, "training.validation.lpips"))
    unit = [(x if isinstance(x, torch.Tensor) else to_tensor(x)).float().cpu() for x in [*results, *targets]]
    pairs = zip(unit[: len(results)], unit[len(results) :], strict=True)
    rows = [scores.paired(same_size(r, t), t, lpips_model) for r, t in pairs]
    return {f"val_{k}": value for k, value in scores.means(rows).items() if k in chosen}


def same_size(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The result at the target's size (bicubic, antialiased): pipelines floor sizes to their multiple (16 for
    FLUX) and an odd original halves and doubles one pixel short."""
    if result.shape[-2:] == target.shape[-2:]:
        return result
    out = torch.nn.functional.interpolate(result[None], size=tuple(target.shape[-2:]), mode="bicubic", antialias=True)
    return out[0].clamp(0, 1)


def reference_metrics(
    config: Config, results: list[Any], references: list[list[Any]], captions: list[str]
) -> dict[str, float]:
    """training.validation.metrics of held-out results against their references (each result against each of its
    reference images: val_clip_i, val_dino, DreamBench's definitions) and captions (val_clip_t)."""
    from diffbase.metrics import features, scores
    from diffbase.metrics.images import to_tensor

    v = config.training.validation
    if not {"clip_i", "dino", "clip_t"} & set(v.metrics) or not results:
        return {}
    fakes = [to_tensor(x) for x in results]
    pairs = [(i, to_tensor(ref)) for i, refs in enumerate(references) for ref in refs]
    mine, refs = [fakes[i] for i, _ in pairs], [ref for _, ref in pairs]
    out: dict[str, float] = {}
    if {"clip_i", "clip_t"} & set(v.metrics):
        clip = cached(f"clip-scores:{v.clip}", lambda: features.clip_for_scores(v.clip, "training.validation.clip"))
        if "clip_i" in v.metrics:
            out["val_clip_i"] = scores.mean_clip_score(clip, mine, refs)
        if "clip_t" in v.metrics:
            out["val_clip_t"] = scores.mean_clip_score(clip, fakes, captions)
    if "dino" in v.metrics:
        net = cached(f"dino:{v.dino}", lambda: features.load(f"dino:{v.dino}", "training.validation.dino"))
        out["val_dino"] = scores.dino_score(net, mine, refs)
    return out


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
        clip = cached(f"clip-scores:{v.clip}", lambda: features.clip_for_scores(v.clip, "training.validation.clip"))
        out["val_clip_t"] = scores.mean_clip_score(clip, fakes, prompts)
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
