"""`diffbase generate`: argument handling around `generate.generate`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffbase import progress
from diffbase.errors import UserError
from diffbase.interface import checks
from diffbase.interface.options import HelpFormatter, add_runtime_arguments


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a --prompts file (generate, eval generate / customize), every fault one line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts: {file} {'is a folder' if file.is_dir() else 'not found'}; expected a text "
                        "file, one prompt per line")  # fmt: skip
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--prompts: {file} is not a text file (expected UTF-8, one prompt per line)") from None
    except OSError as exc:  # unreadable (permissions, I/O): one line, not a traceback
        raise UserError(f"--prompts: cannot read {file} ({exc.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts: {file} has no prompts (expected one prompt per line)")
    return prompts


def run_generate(args: argparse.Namespace) -> None:
    from diffbase.generate import GenerateSettings, generate, metadata, pipeline_kwargs
    from diffbase.io import save_image_atomic, save_png_atomic, writable_folder
    from diffbase.models.loading import detect_family, load_model
    from diffbase.models.lora_loading import apply_loras, check_loras, parse_lora_arg

    if bool(args.prompt) == bool(args.prompts):
        raise UserError("generate: give exactly one of --prompt TEXT (not empty) or --prompts FILE")
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    checks.runtime(args)
    spec = checks.model_folder(args.config or args.model, "--config" if args.config else "--model")
    checks.count(args.steps, "--steps")
    checks.number(args.guidance, "--guidance", low=0)
    checks.number(args.true_cfg, "--true-cfg", low=1)
    height, width = checks.size(args.size, "--size", checks.size_multiple(spec))
    if args.prompts:  # the folder the images go to
        writable_folder(args.out, "--out")
    else:
        checks.output(args.out, "--out", [], args.overwrite)
    checks.output(args.compare, "--compare", [args.out], args.overwrite)

    def settings_for(i: int, prompt: str) -> GenerateSettings:
        return GenerateSettings(
            prompt=prompt, seed=args.seed + i, steps=args.steps, guidance=args.guidance, height=height, width=width,
            negative=args.negative, true_cfg=args.true_cfg, loras=list(args.lora),
        )  # fmt: skip

    folder = Path(args.config) if args.config else Path(args.model)
    if folder.is_dir():  # check the settings against the family before spending time loading
        pipeline_kwargs(detect_family(folder), settings_for(0, prompts[0]))
    check_loras(args.lora, spec)
    if args.compare and not args.lora:
        raise UserError("--compare: shows the images without and with --lora; give at least one --lora")
    pipe, spec = load_model(args.model, config=args.config, **args.runtime.loader())
    args.runtime.use([getattr(pipe, spec.denoiser)])
    progress.pipeline(pipe, "generate")
    without, several = [], len(prompts) > 1 and progress.shown()  # the pipeline's bar shows one image's steps
    if args.compare:  # the same seeds before the LoRAs go in
        for i, prompt in enumerate(progress.bar(prompts, "generate without LoRA", "img", show=several)):
            without.append(generate(pipe, spec, replace(settings_for(i, prompt), loras=[])))
    apply_loras(pipe, spec, args.lora)
    out = Path(args.out)
    bar = progress.bar(prompts, "generate", "img", show=several)
    images = []
    for i, prompt in enumerate(bar):
        settings = settings_for(i, prompt)
        image = generate(pipe, spec, settings)
        images.append(image)
        target = out / f"{i:04d}.png" if args.prompts else out
        save_image_atomic(image, target, metadata(settings, args.model, spec, pipe))
        if not args.prompts:
            print(f"wrote {target}")
    if args.prompts:
        print(f"wrote {len(prompts)} images to {out}")
    if args.runtime.compile:
        from diffbase.compile import graphs

        print(
            f"compile: {graphs()} graphs compiled (one per block class; more: graph breaks, or shapes or LoRAs that recompiled)"
        )
    if args.compare:
        from diffbase.grid import image_grid

        rows = [[a, b] for a, b in zip(without, images, strict=True)]
        scales = [parse_lora_arg(x)[1] for x in args.lora]
        header = ["without LoRA", "with LoRA" + ("" if scales == [1.0] else f" ({', '.join(map(str, scales))})")]
        save_png_atomic(image_grid(rows, labels=prompts, header=header, cell=192), Path(args.compare))
        print(f"wrote {args.compare}")


def add_parsers(sub: Any) -> None:
    gen = sub.add_parser("generate", help="text-to-image with any family", formatter_class=HelpFormatter)
    gen.add_argument("--model", required=True, help="diffusers folder, or a single file with --config")
    gen.add_argument("--config", help="a local diffusers folder of the same family, for a single-file checkpoint")
    gen.add_argument("--prompt", help="what to draw")
    gen.add_argument("--prompts", help="file with one prompt per line; --out is then a folder")
    gen.add_argument("--negative", help="what to avoid (families with a negative prompt)")
    gen.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA file and its scale (repeatable)"
    )
    gen.add_argument("--seed", type=int, default=0, help="noise seed (CPU generator, as diffusers' examples)")
    gen.add_argument("--steps", type=int, default=28, help="sampling steps")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's own)")
    gen.add_argument("--true-cfg", type=float, dest="true_cfg", help="FLUX.1 true CFG scale (with --negative)")
    gen.add_argument("--size", default="512x512", help="HxW")
    add_runtime_arguments(gen)
    gen.add_argument("--out", required=True, help="the image (.png, .jpg, .webp), or with --prompts a folder")
    gen.add_argument("--compare", metavar="GRID.png", help="also a grid of each prompt without and with the --lora")
    gen.add_argument("--overwrite", action="store_true", help="replace --out / --compare when they exist")
    gen.set_defaults(func=run_generate)
