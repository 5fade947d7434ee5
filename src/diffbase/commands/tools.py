"""The small commands around the library: `config show`, `info`, `plan`, `parity`, `doctor` and `demo`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run_config_show(args: argparse.Namespace) -> None:
    from diffbase.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.file, args.overrides)), end="")


def run_info(args: argparse.Namespace) -> None:
    from diffbase.info import describe

    print(describe(args.target, args.overrides))


def run_plan(args: argparse.Namespace) -> None:
    from diffbase.interface import checks
    from diffbase.plan import describe

    if args.gpu_memory is not None:
        checks.number(args.gpu_memory, "--gpu-memory", low=0, low_open=True)
    print(describe(args.config, args.overrides, args.gpu_memory, trace=args.trace))


def run_parity(args: argparse.Namespace) -> None:
    from diffbase.io import writable_folder
    from diffbase.parity import run_parity

    writable_folder(args.out, "--out")
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

    info = sub.add_parser("info", help="parameter counts of a model config or folder (no weights needed)")
    info.add_argument("target", help="a model config YAML or a diffusers folder")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.set_defaults(func=run_info)

    plan = sub.add_parser("plan", help="the GPU memory a training run needs at its peak, and what makes it fit")
    plan.add_argument("config", help="an experiment YAML")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--gpu-memory", type=float, metavar="GIB", help="say whether it fits, else what makes it fit")
    plan.add_argument("--trace", action="store_true",
                      help="also measure the peak: two training steps of the full-size model on fake tensors (no "
                           "weights, no GPU; under a minute on a CPU). LoRA and full fine-tuning, unquantized, "
                           "not offloaded")  # fmt: skip
    plan.set_defaults(func=run_plan)

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
