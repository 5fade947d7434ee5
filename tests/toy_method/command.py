"""`diffbase bias-only`: one image from a model with trained biases, checked before loading as every
command checks its input."""

from __future__ import annotations

import argparse
from typing import Any

from diffbase.interface import checks
from diffbase.interface.options import HelpFormatter, add_output_arguments, add_runtime_arguments


def run(args: argparse.Namespace) -> None:
    from diffbase.generate import GenerateSettings
    from diffbase.interface.options import save_result
    from tests.toy_method.method import BIAS_ONLY

    checks.runtime(args)
    spec = checks.model_folder(args.model, job="bias-only generation")
    checks.weights_file(args.weights, "--weights")
    h, w = checks.size(args.size, "--size", checks.size_multiple(spec))
    checks.count(args.steps, "--steps")
    checks.output(args.out, "--out", [args.weights], args.overwrite)
    loaded = BIAS_ONLY.load(args.model, args.weights, **args.runtime.loader())
    settings = GenerateSettings(prompt=args.prompt, seed=args.seed, steps=args.steps, height=h, width=w)
    save_result(BIAS_ONLY.run(loaded, {}, settings), args.out, {"method": "bias_only", "prompt": args.prompt})


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bias-only", help="text-to-image with trained biases (a method from outside diffbase)",
                       formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a local diffusers folder")
    p.add_argument("--weights", required=True, help="the run's bias/biases.safetensors")
    p.add_argument("--prompt", required=True)
    p.add_argument("--size", default="32x32", help="HxW")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(p)
    add_output_arguments(p, "unused")
    p.set_defaults(func=run)
