"""The small commands around the library: `config show`, `info`, `parity`, `doctor`, `demo` and `serve`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.runtime import add_arguments


def run_config_show(args: argparse.Namespace) -> None:
    from diffbase.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.file, args.overrides)), end="")


def run_info(args: argparse.Namespace) -> None:
    from diffbase.info import describe

    print(describe(args.target, args.overrides))


def run_serve(args: argparse.Namespace) -> None:
    from diffbase.serve import Defaults, Limits, serve

    if min(args.max_upload_mb, args.max_pixels, args.max_seconds, args.max_tiles) <= 0:
        raise UserError("--max-upload-mb / --max-pixels / --max-seconds / --max-tiles: expected positive limits")
    defaults = Defaults(tryon_weights=args.tryon_weights or "", device=args.device, dtype=args.dtype,
                        attention=args.attention)  # fmt: skip
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_seconds, args.max_tiles)
    serve(args.host, args.port, defaults, limits)


def run_parity(args: argparse.Namespace) -> None:
    from diffbase.parity import run_parity

    run_parity(Path(args.out))


def run_doctor(args: argparse.Namespace) -> None:
    from diffbase.doctor import report

    print(report(args.device)[0])


def run_demo(args: argparse.Namespace) -> None:
    from diffbase.demo import run_demo

    run_demo(Path(args.out))


def add_parsers(sub: Any) -> None:
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print a config resolved with its _base_ files and overrides")
    show.add_argument("file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=run_config_show)

    web = sub.add_parser("serve", help="the web UI (Gradio): try-on, DreamFit, DreamO, edit, upscale, training monitor")
    web.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it to your network)")
    web.add_argument("--port", type=int, default=7860)
    add_arguments(web, offload=False)
    web.add_argument("--tryon-weights", help="the try-on tab's default weights (e.g. outputs/demo/run/vton)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="uploads larger than this are refused")
    web.add_argument("--max-pixels", type=int, default=4096 * 4096, help="images with more pixels are refused")
    web.add_argument("--max-seconds", type=float, default=600.0, help="one request's time limit (it stops at a step)")
    web.add_argument("--max-tiles", type=int, default=64, help="the upscale tab's limit on tiles per request")
    web.set_defaults(func=run_serve)

    info = sub.add_parser("info", help="parameter counts of a model config or folder (no weights needed)")
    info.add_argument("target", help="a model config YAML or a diffusers folder")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.set_defaults(func=run_info)

    parity = sub.add_parser(
        "parity", help="every family's tiny model: our generation vs bare diffusers, pixel for pixel"
    )
    parity.add_argument("--out", default="outputs/parity")
    parity.set_defaults(func=run_parity)

    doctor = sub.add_parser("doctor", help="versions, the device, and which attention kernels work here")
    doctor.add_argument("--device", default="auto")
    doctor.set_defaults(func=run_doctor)

    demo = sub.add_parser("demo", help="the main job on the embedded default: try-on learned on a CPU")
    demo.add_argument("--out", default="outputs/demo")
    demo.set_defaults(func=run_demo)
