"""`diffbase edit` (FLUX.1 Kontext, FLUX.2 with reference images) and `diffbase inpaint` (FLUX.1 Fill,
FLUX.2 klein inpainting): argument handling around `diffbase.methods.edit.mechanism`."""

from __future__ import annotations

import argparse
from typing import Any

from diffbase import progress
from diffbase.interface import checks
from diffbase.interface.options import HelpFormatter, add_output_arguments, add_runtime_arguments


def _images(paths: list[str], name: str) -> list[Any]:
    return [checks.image(p, name) for p in paths]


def _settings(args: argparse.Namespace, kind: str, references: int) -> Any:
    """The sampling settings, checked against the model's family (read from its folder, nothing loaded), and
    the number of reference images its pipeline takes (a single file is checked once loaded)."""
    from diffbase.methods.edit.mechanism import EditSettings, check_pipeline, check_references

    checks.runtime(args)
    spec = checks.model_folder(args.model)
    if spec is not None:
        check_pipeline(spec, kind, args.model)
        check_references(spec, kind, references)
    checks.count(args.steps, "--steps")
    checks.number(args.guidance, "--guidance", low=0)
    strength = checks.number(getattr(args, "strength", 1.0), "--strength", 0, 1, low_open=True)
    h = w = None
    if args.size:
        h, w = checks.size(args.size, "--size", checks.size_multiple(spec))
    return EditSettings(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, height=h,
                        width=w, strength=strength)  # fmt: skip


def _outputs(args: argparse.Namespace, inputs: list[str]) -> None:
    checks.output(args.out, "--out", inputs, args.overwrite)
    checks.output(args.grid, "--grid", [*inputs, args.out], args.overwrite)


def _load(args: argparse.Namespace, kind: str) -> tuple[Any, Any]:
    from diffbase.methods.edit.method import load_editing

    pipe, spec = load_editing(args.model, kind, **args.runtime.loader())
    args.runtime.use([getattr(pipe, spec.denoiser)])
    progress.pipeline(pipe, kind)
    return pipe, spec


def _save(args: argparse.Namespace, image: Any, grid: dict[str, Any], meta: dict[str, Any]) -> None:
    from diffbase.interface.options import save_result

    save_result(image, args.out, meta, args.grid, grid)


def run_edit(args: argparse.Namespace) -> None:
    from diffbase.methods.edit.mechanism import check_images, check_references, edit, metadata

    settings = _settings(args, "edit", len(args.image))
    images = _images(args.image, "--image")
    _outputs(args, args.image)
    pipe, spec = _load(args, "edit")
    check_references(spec, "edit", len(images))
    check_images(pipe, images, args.image)
    result = edit(pipe, spec, images, settings)
    meta = metadata(settings, args.model, spec, pipe, {"images": list(args.image)})
    _save(args, result, {f"reference {i + 1}": im for i, im in enumerate(images)}, meta)


def run_inpaint(args: argparse.Namespace) -> None:
    from diffbase.methods.edit.mechanism import check_images, check_references, inpaint, metadata

    settings = _settings(args, "inpaint", len(args.reference))
    image = checks.image(args.image, "--image")
    mask = checks.mask(args.mask, "--mask", image.size)
    references = _images(args.reference, "--reference")
    _outputs(args, [args.image, args.mask, *args.reference])
    pipe, spec = _load(args, "inpaint")
    check_references(spec, "inpaint", len(references))
    check_images(pipe, references, args.reference)
    result = inpaint(pipe, spec, image, mask, settings, references)
    inputs = {"image": args.image, "mask": args.mask} | ({"references": list(args.reference)} if references else {})
    _save(
        args, result, {"image": image, "mask": mask.convert("RGB")}, metadata(settings, args.model, spec, pipe, inputs)
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the instruction (edit) or what the area shows (inpaint)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (CPU generator, as diffusers' examples)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's own)")
    p.add_argument("--size", help="HxW of the result (default: from the image, as the pipeline chooses)")
    add_runtime_arguments(p)
    add_output_arguments(p, "also the inputs and the result side by side")


def add_parsers(sub: Any) -> None:
    e = sub.add_parser(
        "edit",
        aliases=["kontext"],  # the training method's name
        help="reference editing: FLUX.1 Kontext, FLUX.2 dev / klein with reference images",
        formatter_class=HelpFormatter,
    )
    e.add_argument("--model", required=True, help="a local FLUX.1 Kontext or FLUX.2 diffusers folder")
    e.add_argument("--image", action="append", required=True, help="a reference image (FLUX.2: repeat for more)")
    _common(e)
    e.set_defaults(func=run_edit)

    i = sub.add_parser(
        "inpaint",
        aliases=["fill"],  # the training method's name
        help="inpainting: FLUX.1 Fill, FLUX.2 klein inpainting",
        formatter_class=HelpFormatter,
    )
    i.add_argument("--model", required=True, help="a local FLUX.1 Fill or FLUX.2 klein inpainting diffusers folder")
    i.add_argument("--image", required=True, help="the image to repaint")
    i.add_argument("--mask", required=True, help="white where the image is repainted; the image's size")
    i.add_argument("--reference", action="append", default=[], help="FLUX.2 klein: a reference image (repeatable)")
    i.add_argument("--strength", type=float, default=1.0, help="1.0 repaints the masked area from pure noise")
    _common(i)
    i.set_defaults(func=run_inpaint)
