"""`diffbase dreamfit`: garment-centric generation, pose-guided generation and try-on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase import progress
from diffbase.errors import UserError
from diffbase.interface import checks
from diffbase.interface.options import HelpFormatter, add_output_arguments, add_runtime_arguments


def run_dreamfit(args: argparse.Namespace) -> None:
    from diffbase.interface.options import save_result
    from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings
    from diffbase.methods.dreamfit.method import DREAMFIT
    from diffbase.pose import render_openpose

    checks.runtime(args)
    checks.model_folder(args.model, family="flux1", job="DreamFit")
    checks.weights_file(args.checkpoint, "--checkpoint")
    checks.count(args.steps, "--steps")
    checks.number(args.guidance, "--guidance", low=0)
    checks.number(args.true_cfg, "--true-cfg", low=1)
    checks.number(args.lora_weight, "--lora-weight")
    h, w = checks.size(args.size, "--size", 16)
    inputs: dict[str, Any] = {"garment": checks.image(args.garment, "--garment")}
    if args.pose:
        pose_path = Path(args.pose)
        inputs["pose"] = render_openpose(pose_path, (w, h)) if pose_path.suffix == ".json" else checks.image(
            args.pose, "--pose")  # fmt: skip
    if args.mode == "tryon":
        if not (args.person and args.mask):
            raise UserError("--mode tryon: needs --person and --mask (and optionally --pose)")
        inputs["person"] = checks.image(args.person, "--person")
        inputs["mask"] = checks.mask(args.mask, "--mask", inputs["person"].size)
    if args.mode == "pose" and "pose" not in inputs:
        raise UserError("--mode pose: needs --pose")
    given = [args.garment, args.pose, args.person, args.mask]
    checks.output(args.out, "--out", given, args.overwrite)
    checks.output(args.grid, "--grid", [*given, args.out], args.overwrite)
    loaded = DREAMFIT.load(
        args.model, args.checkpoint, args.lora_weight, args.lora_weight_mode, **args.runtime.loader()
    )
    args.runtime.use_attention([])  # DreamFit's own processors call PyTorch's SDPA: the kernel choice applies
    progress.pipeline(loaded[0], "dreamfit")
    settings = DreamFitSettings(
        prompt=args.prompt,
        mode=args.mode,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=h,
        width=w,
        true_cfg=args.true_cfg,
    )
    image = DREAMFIT.run(loaded, inputs, settings, repaint=not args.no_repaint)
    meta = {
        "mode": args.mode,
        "prompt": args.prompt,
        "model": args.model,
        "checkpoint": args.checkpoint,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "lora_weight": args.lora_weight,
        "true_cfg": args.true_cfg,
        "size": [h, w],
        "repaint": args.mode == "tryon" and not args.no_repaint,
    }
    save_result(image, args.out, meta, args.grid, {k: inputs[k] for k in ("person", "pose", "garment") if k in inputs})


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "dreamfit",
        help="DreamFit on FLUX.1: garment, pose-guided or try-on generation",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--mode", choices=["garment", "pose", "tryon"], default="garment", help="what to generate")
    p.add_argument("--model", required=True, help="a local FLUX.1 diffusers folder")
    p.add_argument("--checkpoint", required=True, help="flux_i2i.bin, flux_i2i_with_pose.bin or flux_tryon.bin")
    p.add_argument("--garment", required=True, help="the garment photo")
    p.add_argument("--pose", help="a pose render, or an OpenPose keypoints .json that diffbase draws")
    p.add_argument("--person", help="try-on: the person")
    p.add_argument("--mask", help="try-on: the garment area on the person")
    p.add_argument("--prompt", required=True, help="what the picture shows")
    p.add_argument("--size", default="1024x768", help="HxW")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0, help="FLUX guidance value")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG with the negative write pass")
    p.add_argument("--lora-weight", type=float, default=1.0, help="DreamFit LoRA strength")
    p.add_argument(
        "--lora-weight-mode",
        choices=["official", "linear"],
        default="official",
        help="official: the processor LoRAs scale by lora_weight squared, as the official loader does",
    )
    p.add_argument("--no-repaint", action="store_true", help="try-on: keep the model's pixels outside the mask too")
    add_runtime_arguments(p)
    add_output_arguments(p, "also the inputs and the result side by side")
    p.set_defaults(func=run_dreamfit)
