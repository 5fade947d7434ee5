"""`diffbase zoo tiny | pretrain`: tiny models for tests and trials, and the toy models the demo ships."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run_tiny(args: argparse.Namespace) -> None:
    from diffbase.io import writable_folder
    from diffbase.models.zoo import write_tiny

    writable_folder(args.out_dir, "out_dir")
    out = write_tiny(args.family, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.family} model to {out}")


def run_pretrain(args: argparse.Namespace) -> None:
    from diffbase.interface import checks
    from diffbase.io import writable_folder
    from diffbase.toy.pretrain import pretrain

    for value, flag in ((args.vae_steps, "--vae-steps"), (args.unet_steps, "--unet-steps"),
                        (args.decoder_steps, "--decoder-steps")):  # fmt: skip
        checks.count(value, flag, least=0)
    checks.count(args.pool, "--pool")
    writable_folder(args.out, "out")
    start = Path(args.start) if args.start else None
    out = pretrain(args.name, Path(args.out), args.vae_steps, args.unet_steps, seed=args.seed, pool_size=args.pool,
                   decoder_steps=args.decoder_steps, start=start)  # fmt: skip
    print(f"wrote {out}")


def add_parsers(sub: Any) -> None:
    zoo = sub.add_parser("zoo", help="tiny models for tests and trials").add_subparsers(dest="action", required=True)
    tiny = zoo.add_parser("tiny", help="write a complete tiny diffusers folder for a family")
    tiny.add_argument("family", help="sd15, sdxl, sd3, flux1, flux2, flux2-klein, flux1-kontext, flux1-fill, "
                      "flux2-klein-inpaint, or dinov2 (a tiny DINOv2 for the upscaler)")  # fmt: skip
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=run_tiny)

    pre = zoo.add_parser("pretrain", help="train a toy model of the embedded default on synthetic people")
    pre.add_argument("name", choices=["sd15-toy", "flux1-toy"])
    pre.add_argument("out")
    pre.add_argument("--vae-steps", type=int, default=1500)
    pre.add_argument("--unet-steps", type=int, default=4000, help="denoiser steps (UNet or transformer)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--pool", type=int, default=3000, help="synthetic training items drawn from")
    pre.add_argument("--decoder-steps", type=int, default=0, help="then the VAE decoder alone, with hue rotation")
    pre.add_argument("--from", dest="start", help="an earlier result to continue: --unet-steps more denoiser steps "
                     "with every colour (hue rotation), then --decoder-steps")  # fmt: skip
    pre.set_defaults(func=run_pretrain)
