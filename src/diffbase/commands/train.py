"""`diffbase train` and `diffbase cache`: an experiment config, its overrides and the runtime flags."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffbase.runtime import add_arguments, config_overrides


def run_train(args: argparse.Namespace) -> None:
    from diffbase import progress
    from diffbase.config import load_config
    from diffbase.methods import train
    from diffbase.plan import check_fits
    from diffbase.runtime import resolve_device
    from diffbase.training.loop import process_state

    overrides = args.overrides + config_overrides(args)
    config = load_config(args.config, overrides)
    check_fits(args.config, overrides, resolve_device(config.hardware.device, "hardware.device"))
    result = train(config, resume=args.resume, overwrite=args.overwrite, show_progress=progress.shown())
    if process_state(config).is_main_process:
        print(f"trained {result.steps} steps; outputs in {result.output_dir}")


def run_cache(args: argparse.Namespace) -> None:
    from diffbase import progress
    from diffbase.config import load_config
    from diffbase.data.cache import build_cache
    from diffbase.io import writable_folder
    from diffbase.methods import get
    from diffbase.training.train import load_backbone

    config = load_config(args.config, args.overrides + config_overrides(args))
    d = config.data
    writable_folder(
        d.cache_dir or config.experiment.output_dir, "data.cache_dir" if d.cache_dir else "experiment.output_dir"
    )
    if not (d.cache_latents or d.cache_text):
        print(
            "note: data.cache_latents and data.cache_text are off in this config, so `train` will not read "
            "this cache; set them (data.cache_latents=true data.cache_text=true) when you train",
            file=sys.stderr,
        )
        config.data.cache_latents = config.data.cache_text = True
    bb = load_backbone(config)
    _, stats = build_cache(config, bb, get(config.training.method).dataset(config, False, bb), progress.shown())
    print(f"cache: {stats.summary()}")


def add_parsers(sub: Any) -> None:
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
    tr.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when not a terminal)")
    tr.set_defaults(func=run_train)

    cache = sub.add_parser("cache", help="precompute the latent and text cache of an experiment")
    cache.add_argument("config", help="experiment YAML")
    cache.add_argument("overrides", nargs="*", metavar="key=value")
    add_arguments(cache, dtype_default=None, offload=False)
    cache.add_argument(
        "--quiet", action="store_true", help="no progress bars (they are off anyway when not a terminal)"
    )
    cache.set_defaults(func=run_cache)
