"""Reference editing (`kontext`) and inpainting (`fill`) trained on paired data, LoRA or full fine-tuning.

- kontext: FLUX.1 Kontext or FLUX.2 (dev, klein). The `source` image (and FLUX.2's `reference`,
  `reference_2`, ... after it) become reference tokens after the target's, with the pipelines' ids
  (`editing.prepare_kontext_conditioning`); flow matching on the target (`image`).
- fill: FLUX.1 Fill. The target with its `mask` area blanked, and the mask, become extra input channels
  (`editing.prepare_fill_conditioning`); items without a mask get a random box. FLUX.2 klein inpainting:
  the image being inpainted (`source`; without one, the target with the area blanked) becomes reference
  tokens, as Flux2KleinInpaintPipeline passes its `image`, and the loss is taken inside the mask only
  (the pipeline keeps the rest of the image from the input at every step).

Data: metadata.json(l) entries with `image` (the target), `source` (kontext), optional `mask`, and a
caption (the instruction); every slot is cut with the target, so a source of another size or aspect is
resized to the target's bucket. Validation: source | result | target (fill: masked | result | target)
for held-out pairs through the family's own pipeline with the weights being trained.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import full_finetune, lora, text_to_image
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.models import backbone as B
from diffbase.training.metrics import PAIRED_METRICS
from diffbase.training.validation import paired_metrics


@dataclass
class EditConfig:
    """Kontext and Fill training (LoRA settings from `training.lora`)."""

    train: Literal["lora", "full"] = "lora"
    validation_pairs: int = 4  # held-out pairs in the validation grid


def _prepare(kind: str, bb: Any, config: Config) -> Trained:
    from diffbase.methods.edit.mechanism import EDIT_PIPELINES, INPAINT_PIPELINES

    pipeline = bb.spec.pipeline
    if kind == "kontext" and pipeline not in EDIT_PIPELINES:
        raise UserError(f"training.method: kontext trains a {sorted(EDIT_PIPELINES)} folder; "
                        f"model.pretrained_path holds a {pipeline}")  # fmt: skip
    if kind == "fill" and pipeline not in INPAINT_PIPELINES:
        raise UserError(f"training.method: fill trains a {sorted(INPAINT_PIPELINES)} folder; "
                        f"model.pretrained_path holds a {pipeline}")  # fmt: skip
    if kind == "fill" and pipeline == "FluxFillPipeline" and config.data.cache_latents:
        raise UserError("data.cache_latents: fill blanks the mask area in pixels every step; use data.cache_text only")
    train = config.training.edit.train
    return (lora.prepare if train == "lora" else full_finetune.prepare)(bb, config)


def sources(batch: dict[str, Any]) -> list[str]:
    """The reference slots of a batch in order: source, reference, reference_2, ..."""
    refs = sorted((k for k in batch if k == "reference" or k.startswith("reference_")), key=lambda k: (len(k), k))
    return (["source"] if "source" in batch else []) + refs


KLEIN_INPAINT = "Flux2KleinInpaintPipeline"


def takes_references(config: Config, bb: Any) -> bool:
    """Kontext, and FLUX.2 klein inpainting (its image goes in as reference tokens), read the pairs' sources."""
    return config.training.method == "kontext" or bb.spec.pipeline == KLEIN_INPAINT


def reference_slots(records: list[Any]) -> tuple[str, ...]:
    """The source and reference slots any record of the data has, sorted."""
    return tuple(sorted({s for r in records for s in r.slots if s == "source" or s.startswith("reference")}))


def kontext_conditioning(bb: Any, batch: dict[str, Any], cache: Any) -> B.Conditioning:
    from diffbase.methods.edit.mechanism import prepare_kontext_conditioning, reference_tokens

    slots = sources(batch)  # items load every companion image, cached or not
    if not slots:
        raise UserError("training.method: kontext needs a 'source' image for every pair in the metadata")
    if cache is not None and cache.latents is not None and "source" in cache.latent_keys:
        # the posterior means, as the pipelines encode references
        means = [cache.posterior(batch, slot)[0] for slot in slots]
        return reference_tokens(bb, [B.normalize(bb, m.float().to(bb.device)) for m in means])
    pixels = [batch[s].to(bb.device) for s in slots]
    return prepare_kontext_conditioning(pixels, bb, bb.device, torch.float32)


def random_boxes(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One random box per item (a quarter to three quarters of each side), 1 = repaint."""
    _, _, h, w = shape
    masks = torch.zeros(shape[0], 1, h, w)
    for k, g in enumerate(generators):
        bh = int(torch.randint(h // 4, 3 * h // 4 + 1, (1,), generator=g))
        bw = int(torch.randint(w // 4, 3 * w // 4 + 1, (1,), generator=g))
        y = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        x = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        masks[k, :, y : y + bh, x : x + bw] = 1
    return masks


def fill_conditioning(bb: Any, batch: dict[str, Any], seed: int, step: int, masked_loss: bool) -> B.Conditioning:
    from diffbase.methods.edit.mechanism import prepare_fill_conditioning

    pixels = batch["pixels"].to(bb.device)
    return prepare_fill_conditioning(
        pixels, inpaint_region(batch, seed, step, masked_loss).to(bb.device), bb, bb.device, torch.float32
    )


def inpaint_region(batch: dict[str, Any], seed: int, step: int, masked_loss: bool) -> torch.Tensor:
    """The pair's mask (1 = repaint), or a random box when it has none (or its mask weights the loss:
    data.masked_loss)."""
    from diffbase.training.step import sample_generator

    mask = None if masked_loss else batch.get("mask")
    if mask is None:
        mask = random_boxes(tuple(batch["pixels"].shape), [sample_generator(seed + 7, step, i) for i in batch["index"]])
    return mask


def klein_inpaint_conditioning(bb: Any, batch: dict[str, Any], cache: Any, region: torch.Tensor) -> B.Conditioning:
    """FLUX.2 klein inpainting's reference: the image being inpainted (the pair's `source`; without one, the
    target with the area to repaint blanked), as Flux2KleinInpaintPipeline passes its `image`."""
    from diffbase.methods.edit.mechanism import prepare_kontext_conditioning

    if sources(batch):
        return kontext_conditioning(bb, batch, cache)
    pixels = batch["pixels"].to(bb.device)
    return prepare_kontext_conditioning([pixels * (1 - region.to(pixels))], bb, bb.device, torch.float32)


def _loss(kind: str, config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int) -> Any:
    from diffbase.training.loop import encode_batch
    from diffbase.training.step import diffusion_step_loss

    masked = config.data.masked_loss
    encoded, cond = encode_batch(bb, batch, cache, ("mask",) if masked else ())
    if kind == "kontext":
        conditioning = kontext_conditioning(bb, batch, cache)
    elif bb.spec.pipeline == KLEIN_INPAINT:  # the pipeline keeps the rest: the loss is the area's
        region = inpaint_region(batch, config.experiment.seed, step, masked)
        conditioning = klein_inpaint_conditioning(bb, batch, cache, region)
        encoded["mask"] = region.to(bb.device)
    else:
        conditioning = fill_conditioning(bb, batch, config.experiment.seed, step, masked)
    value = diffusion_step_loss(
        bb, config.training.objective, encoded, cond, config.experiment.seed, step,
        weights=batch.get("weight"), conditioning=conditioning,
    )  # fmt: skip
    return value, {}


def _validate(
    kind: str, config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]
) -> Validation:
    """Held-out pairs through the family's pipeline (the weights being trained are in it), and the
    held-out loss."""
    from diffbase.data.datasets import to_pil
    from diffbase.grid import image_grid

    held_out, _ = validation
    if held_out is None:
        return Validation()
    v, e = config.training.validation, config.training.edit
    rows, header = [], (["source", "result", "target"] if kind == "kontext" else ["masked", "result", "target"])
    bb.pipe.set_progress_bar_config(disable=True)
    for i in range(min(e.validation_pairs, len(held_out))):
        batch = held_out.collate([held_out.item(i, pixels=True)])
        if not batch["index"]:
            continue
        target = to_pil(batch["pixels"][0])
        h, w = batch["pixels"].shape[-2:]
        kwargs: dict[str, Any] = {"prompt": batch["caption"][0], "num_inference_steps": v.steps, "height": h, "width": w,
                                  "generator": torch.Generator("cpu").manual_seed(config.experiment.seed)}  # fmt: skip
        if kind == "kontext":
            refs = [to_pil(batch[s][0]) for s in sources(batch)]
            first = refs[0]
            kwargs["image"] = refs[0] if bb.spec.pipeline == "FluxKontextPipeline" else refs
            if bb.spec.pipeline == "FluxKontextPipeline":  # the pair's own size, not 1024^2
                kwargs["_auto_resize"], kwargs["max_area"] = False, h * w
        else:
            mask = batch.get("mask")
            mask = mask if mask is not None else random_boxes((1, 1, h, w), [torch.Generator().manual_seed(i)])
            from PIL import Image

            kwargs["mask_image"] = Image.fromarray((mask[0, 0] > 0.5).numpy().astype("uint8") * 255, "L")
            first = to_pil(batch["pixels"][0] * (1 - mask[0]))
            klein = bb.spec.pipeline == KLEIN_INPAINT
            kwargs["image"] = (to_pil(batch[sources(batch)[0]][0]) if sources(batch) else first) if klein else target
        with torch.no_grad():
            result = bb.pipe(**kwargs, **B.text_length(bb.pipe, bb.family)).images[0]
        rows.append([first, result, target])
    grid = image_grid(rows, header=header, cell=128) if rows else None
    paired = paired_metrics(config, [r[1] for r in rows], [r[2] for r in rows])
    return Validation(grid, {"val_loss": held_out_loss(kind, config, bb, trained, held_out)} | paired)


def held_out_loss(kind: str, config: Config, bb: Any, trained: Trained, held_out: Any, pairs: int = 8) -> float:
    """The loss on (up to `pairs`) held-out pairs with fixed noise and timesteps: comparable across steps."""
    from diffbase.training.loop import read_batch

    values = []
    for indices in itertools.islice(held_out.sampler(1, shuffle=False), pairs):  # one item per batch
        batch = read_batch(held_out, indices)
        if batch["index"]:
            with torch.no_grad():
                values.append(float(_loss(kind, config, bb, trained, batch, None, 10**6)[0]))
    return sum(values) / len(values) if values else float("nan")


def _dataset(config: Config, held_out: bool, bb: Any) -> Any:
    """Paired edits; a source (or reference) of another size than its target keeps its own shape."""
    data = text_to_image.dataset(config, held_out, bb)
    if data is not None and takes_references(config, bb):
        data.bucket_slots_separately(reference_slots(data.records))
    return data


def _export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    return (lora.export if config.training.edit.train == "lora" else full_finetune.export)(config, bb, trained, out_dir)


def _cache(config: Config, bb: Any, dataset: Any, show_progress: bool) -> Any:
    """The image's latents and the source's (kontext), and the captions; held-out pairs keep their
    pixels and the encoders stay for validation through the pipeline."""
    from diffbase.data.cache import build_cache

    slots = ("image", *reference_slots(dataset.records)) if takes_references(config, bb) else ("image",)
    return build_cache(config, bb, dataset, show_progress, slots=slots)


def _method(kind: str, describe: str) -> Method:
    return Method(
        name=kind,
        prepare=functools.partial(_prepare, kind),
        loss=functools.partial(_loss, kind),
        export=_export,
        dataset=_dataset,
        validate=functools.partial(_validate, kind),
        metrics=PAIRED_METRICS,
        section=("edit", EditConfig) if kind == "kontext" else None,
        cache=_cache,
        describe=describe,
    )


KONTEXT = register(_method("kontext", "reference editing: source images as reference tokens (Kontext, FLUX.2)"))
FILL = register(
    _method(
        "fill",
        "inpainting: the masked target and mask as extra channels (FLUX.1 Fill), or the "
        "image as reference tokens and the loss on the area (FLUX.2 klein inpainting)",
    )
)


def load_editing(model: str, kind: str, **runtime: Any) -> tuple[Any, Any]:
    """The pipeline for `edit` or `inpaint`, after checking that the folder's pipeline does this job
    (before loading weights); the command and the web UI load through this."""
    from diffbase.methods.edit.mechanism import check_pipeline
    from diffbase.models.loading import detect_family, load_model

    folder = Path(model)
    if folder.is_dir():
        check_pipeline(detect_family(folder), kind, model)
    pipe, spec = load_model(model, **runtime)
    check_pipeline(spec, kind, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec
