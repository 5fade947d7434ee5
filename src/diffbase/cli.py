"""The `diffbase` command. Heavy libraries are imported inside each command, so `--help` is fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffbase.commands.options import HelpFormatter, add_runtime_arguments
from diffbase.errors import Stopped, UserError
from diffbase.runtime import add_arguments, config_overrides


def _cmd_config_show(args: argparse.Namespace) -> None:
    from diffbase.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.file, args.overrides)), end="")


def _cmd_zoo_tiny(args: argparse.Namespace) -> None:
    from diffbase.models.zoo import write_tiny

    out = write_tiny(args.family, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.family} model to {out}")


def _cmd_zoo_pretrain(args: argparse.Namespace) -> None:
    from diffbase.toy.pretrain import pretrain

    start = Path(args.start) if args.start else None
    out = pretrain(args.name, Path(args.out), args.vae_steps, args.unet_steps, seed=args.seed, pool_size=args.pool,
                   decoder_steps=args.decoder_steps, start=start)  # fmt: skip
    print(f"wrote {out}")


def _cmd_info(args: argparse.Namespace) -> None:
    from diffbase.info import describe

    print(describe(args.target, args.overrides))


def _cmd_generate(args: argparse.Namespace) -> None:
    from diffbase.commands.generate import run_generate

    run_generate(args)


def _cmd_train(args: argparse.Namespace) -> None:
    from diffbase.config import load_config
    from diffbase.methods import train
    from diffbase.training.loop import process_state

    config = load_config(args.config, args.overrides + config_overrides(args))
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if process_state(config).is_main_process:
        print(f"trained {result.steps} steps; outputs in {result.output_dir}")


def _cmd_cache(args: argparse.Namespace) -> None:
    from diffbase.config import load_config
    from diffbase.data.cache import build_cache
    from diffbase.methods import get
    from diffbase.training.train import load_backbone

    config = load_config(args.config, args.overrides + config_overrides(args))
    d = config.data
    if not (d.cache_latents or d.cache_text):
        print(
            "note: data.cache_latents and data.cache_text are off in this config, so `train` will not read "
            "this cache; set them (data.cache_latents=true data.cache_text=true) when you train",
            file=sys.stderr,
        )
        config.data.cache_latents = config.data.cache_text = True
    bb = load_backbone(config)
    _, stats = build_cache(config, bb, get(config.training.method).dataset(config, False, bb))
    print(f"cache: {stats.summary()}")


def _cmd_data_synth(args: argparse.Namespace) -> None:
    from diffbase.generate import parse_size
    from diffbase.toy.synthetic import write_dataset

    h, w = parse_size(args.size)
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 4)
    write_dataset(Path(args.out), args.n, n_test, seed=args.seed, size=(w, h))
    print(f"wrote {args.n} training and {n_test} held-out try-on items to {args.out}")


def _cmd_data_synth_edit(args: argparse.Namespace) -> None:
    from diffbase.generate import parse_size
    from diffbase.toy.synthetic import write_edit_pairs

    h, w = parse_size(args.size)
    write_edit_pairs(Path(args.out), args.n, seed=args.seed, size=(w, h))
    print(f"wrote {args.n} edit pairs (source, target, mask, instruction) to {args.out}/metadata.jsonl")


def _cmd_data_synth_dreamo(args: argparse.Namespace) -> None:
    from diffbase.generate import parse_size
    from diffbase.toy.synthetic import write_multi_reference

    h, w = parse_size(args.size)
    write_multi_reference(Path(args.out), args.n, seed=args.seed, size=(w, h))
    print(
        f"wrote {args.n} two-reference items (references, target, subject masks, caption) to {args.out}/metadata.jsonl"
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    from diffbase.serve import Defaults, Limits, serve

    if min(args.max_upload_mb, args.max_pixels, args.max_seconds, args.max_tiles) <= 0:
        raise UserError("--max-upload-mb / --max-pixels / --max-seconds / --max-tiles: expected positive limits")
    defaults = Defaults(tryon_weights=args.tryon_weights or "", device=args.device, dtype=args.dtype,
                        attention=args.attention)  # fmt: skip
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_seconds, args.max_tiles)
    serve(args.host, args.port, defaults, limits)


def _cmd_parity(args: argparse.Namespace) -> None:
    from diffbase.parity import run_parity

    run_parity(Path(args.out))


def _cmd_doctor(args: argparse.Namespace) -> None:
    from diffbase.doctor import report

    print(report(args.device)[0])


def _cmd_demo(args: argparse.Namespace) -> None:
    from diffbase.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbase",
        description="Train and run diffusion image-customization models from local weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print a config resolved with its _base_ files and overrides")
    show.add_argument("file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=_cmd_config_show)

    web = sub.add_parser("serve", help="the web UI (Gradio): try-on, DreamFit, DreamO, edit, upscale, training monitor")
    web.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it to your network)")
    web.add_argument("--port", type=int, default=7860)
    add_arguments(web, offload=False)
    web.add_argument("--tryon-weights", help="the try-on tab's default weights (e.g. outputs/demo/run/vton)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="uploads larger than this are refused")
    web.add_argument("--max-pixels", type=int, default=4096 * 4096, help="images with more pixels are refused")
    web.add_argument("--max-seconds", type=float, default=600.0, help="one request's time limit (it stops at a step)")
    web.add_argument("--max-tiles", type=int, default=64, help="the upscale tab's limit on tiles per request")
    web.set_defaults(func=_cmd_serve)

    zoo = sub.add_parser("zoo", help="tiny models for tests and trials").add_subparsers(dest="action", required=True)
    tiny = zoo.add_parser("tiny", help="write a complete tiny diffusers folder for a family")
    tiny.add_argument("family", help="sd15, sdxl, sd3, flux1, flux2, flux2-klein, flux1-kontext, flux1-fill, "
                      "flux2-klein-inpaint, or dinov2 (a tiny DINOv2 for the upscaler)")  # fmt: skip
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_zoo_tiny)

    pre = zoo.add_parser("pretrain", help="train a toy model of the embedded default on synthetic people")
    pre.add_argument("name", choices=["sd15-toy", "flux1-toy"])
    pre.add_argument("out")
    pre.add_argument("--vae-steps", type=int, default=1500)
    pre.add_argument("--unet-steps", type=int, default=4000, help="denoiser steps (UNet or transformer)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--pool", type=int, default=3000, help="synthetic training items drawn from")
    pre.add_argument("--decoder-steps", type=int, default=0, help="then the VAE decoder alone, with hue rotation")
    pre.add_argument(
        "--from",
        dest="start",
        help="an earlier result to continue: --unet-steps more denoiser steps with every colour (hue rotation), then --decoder-steps",
    )
    pre.set_defaults(func=_cmd_zoo_pretrain)

    info = sub.add_parser("info", help="parameter counts of a model config or folder (no weights needed)")
    info.add_argument("target", help="a model config YAML or a diffusers folder")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.set_defaults(func=_cmd_info)

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
    gen.set_defaults(func=_cmd_generate)

    tr = sub.add_parser(
        "train",
        help="train with an experiment config (LoRA, full fine-tune, DreamBooth, ControlNet, "
        "try-on, DreamFit, DreamO, Kontext, Fill, the upscaler's DINO adapter)",
    )
    tr.add_argument("config", help="experiment YAML")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--resume", help="'latest' or a checkpoint folder")
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder")
    add_arguments(tr, dtype_default=None, offload=False)
    tr.set_defaults(func=_cmd_train)

    from diffbase.commands.customize import add_parser as add_customize
    from diffbase.commands.dreamfit import add_parser as add_dreamfit
    from diffbase.commands.edit import add_parsers as add_editing
    from diffbase.commands.tryon import add_eval_parser, add_parsers
    from diffbase.commands.upscale import add_parser as add_upscale

    add_parsers(sub)
    add_dreamfit(sub)
    add_customize(sub)
    add_upscale(sub)
    add_editing(sub)
    ev = sub.add_parser("eval", help="evaluate a trained method on a dataset").add_subparsers(
        dest="what", required=True
    )
    add_eval_parser(ev)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write the synthetic try-on dataset (train and held-out splits)")
    synth.add_argument("out")
    synth.add_argument("--n", type=int, default=200, help="training items")
    synth.add_argument("--n-test", type=int, help="held-out items (default n/4)")
    synth.add_argument("--size", default="64x64", help="HxW")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)
    synthetic = (
        ("synth-edit", "write synthetic paired edits (recoloured garments) for kontext / fill", "pairs", "64x64",
         "HxW", _cmd_data_synth_edit),
        ("synth-dreamo", "write synthetic two-reference items (two garments placed by [ref#N])", "items", "32x32",
         "HxW of one reference (the target is twice as wide)", _cmd_data_synth_dreamo),
    )  # fmt: skip
    for name, text, unit, size, size_help, func in synthetic:
        p = data.add_parser(name, help=text)
        p.add_argument("out")
        p.add_argument("--n", type=int, default=200, help=unit)
        p.add_argument("--size", default=size, help=size_help)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)

    cache = sub.add_parser("cache", help="precompute the latent and text cache of an experiment")
    cache.add_argument("config", help="experiment YAML")
    cache.add_argument("overrides", nargs="*", metavar="key=value")
    add_arguments(cache, dtype_default=None, offload=False)
    cache.set_defaults(func=_cmd_cache)

    parity = sub.add_parser(
        "parity", help="every family's tiny model: our generation vs bare diffusers, pixel for pixel"
    )
    parity.add_argument("--out", default="outputs/parity")
    parity.set_defaults(func=_cmd_parity)

    doctor = sub.add_parser("doctor", help="versions, the device, and which attention kernels work here")
    doctor.add_argument("--device", default="auto")
    doctor.set_defaults(func=_cmd_doctor)

    demo = sub.add_parser("demo", help="the main job on the embedded default: try-on learned on a CPU")
    demo.add_argument("--out", default="outputs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow options such as --resume
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        import diffbase.methods  # noqa: F401  (registers the methods and their config sections)
        from diffbase import progress

        progress.set_quiet(getattr(args, "quiet", False))
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
