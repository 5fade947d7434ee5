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

    checks.runtime(args)
    checks.model_folder(args.model, family="flux1", job="DreamFit")
    checks.weights_file(args.checkpoint, "--checkpoint")
    checks.count(args.steps, "--steps")
    checks.number(args.guidance, "--guidance", low=0)
    checks.number(args.true_cfg, "--true-cfg", low=1)
    checks.number(args.lora_weight, "--lora-weight")
    h, w = checks.size(args.size, "--size", 16)
    inputs, person = given_inputs(args, (w, h))
    given = [args.garment, args.pose, args.person, args.mask]
    checks.output(args.out, "--out", given, args.overwrite)
    checks.output(args.grid, "--grid", [*given, args.out], args.overwrite)
    inputs |= computed_inputs(args, person)
    loaded = DREAMFIT.load(
        args.model, args.checkpoint, args.lora_weight, args.lora_weight_mode, **args.runtime.loader()
    )
    args.runtime.use([loaded[0].transformer], backend=False)  # its own processors call PyTorch's SDPA
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
    meta |= {"pose": "auto", "pose_model": args.pose_model} if args.pose == "auto" else {}
    meta |= {"mask": "auto", "cloth_type": args.cloth_type, "parser": args.parser} if auto_mask(args) else {}
    save_result(image, args.out, meta, args.grid, {k: inputs[k] for k in ("person", "pose", "garment") if k in inputs})


def auto_mask(args: argparse.Namespace) -> bool:
    return args.mode == "tryon" and args.mask == "auto"


def given_inputs(args: argparse.Namespace, size: tuple[int, int]) -> tuple[dict[str, Any], Any]:
    """The inputs read from files (a pose JSON drawn at `size`), and the person photo when something needs it."""
    from diffbase.pose import render_openpose

    inputs: dict[str, Any] = {"garment": checks.image(args.garment, "--garment")}
    if args.mode == "pose" and not args.pose:
        raise UserError("--mode pose: needs --pose")
    if args.mode == "tryon" and not (args.person and args.mask):
        raise UserError("--mode tryon: needs --person and --mask (and optionally --pose)")
    if args.pose == "auto" and not args.person:
        raise UserError("--pose auto: needs --person, the photo whose pose --pose-model estimates")
    person = checks.image(args.person, "--person") if args.mode == "tryon" or args.pose == "auto" else None
    if args.pose and args.pose != "auto":
        pose_path = Path(args.pose)
        inputs["pose"] = render_openpose(pose_path, size) if pose_path.suffix == ".json" else checks.image(
            args.pose, "--pose")  # fmt: skip
    if args.mode == "tryon":
        inputs["person"] = person
        if not auto_mask(args):
            inputs["mask"] = checks.mask(args.mask, "--mask", person.size)
    return inputs, person


def computed_inputs(args: argparse.Namespace, person: Any) -> dict[str, Any]:
    """`--mask auto` (the human parser's garment area) and `--pose auto` (ViTPose's keypoints, in the person's
    box when --parser is given), from --person, each saved beside --out: OUT_mask.png, OUT_keypoints.json."""
    from diffbase.data import preprocess_models as pm
    from diffbase.io import save_png_atomic
    from diffbase.pose import render_openpose

    out: dict[str, Any] = {}
    use_parser = auto_mask(args) or (args.pose == "auto" and args.parser)
    mask_file = pm.beside(args.out, "_mask.png", "--mask auto", args.overwrite) if auto_mask(args) else None
    pose_file = pm.beside(args.out, "_keypoints.json", "--pose auto", args.overwrite) if args.pose == "auto" else None
    parsing = pm.load_parser(args.parser, "--parser", args.runtime.device)(person) if use_parser else None
    if mask_file is not None:
        out["mask"] = pm.auto_garment_mask(parsing, args.cloth_type)
        save_png_atomic(out["mask"], mask_file)
        print(f"wrote {mask_file} (--mask auto, {args.cloth_type})")
    if pose_file is not None:
        box = pm.mask_box(pm.foreground(parsing.labels, parsing.id2label)) if parsing is not None else None
        points = pm.load_pose_model(args.pose_model, "--pose-model", args.runtime.device)(person, box)
        pm.write_keypoints(pose_file, points, person.size)
        print(f"wrote {pose_file} (--pose auto)")
        out["pose"] = render_openpose(pose_file, person.size)
    return out


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
    p.add_argument("--pose", help="a pose render, an OpenPose keypoints .json that diffbase draws, or 'auto' "
                   "(--pose-model on --person)")  # fmt: skip
    p.add_argument("--pose-model", help="--pose auto: a local ViTPose folder (COCO keypoints)")
    p.add_argument("--person", help="try-on: the person (--pose auto: the photo whose pose to take)")
    p.add_argument("--mask", help="try-on: the garment area on the person, or 'auto' (from --parser)")
    p.add_argument("--parser", help="--mask auto: a local human-parsing model folder (SegFormer, ATR / LIP labels); "
                   "with --pose auto it also gives the person's box")  # fmt: skip
    p.add_argument("--cloth-type", choices=["upper", "lower", "overall"], default="upper",
                   help="--mask auto: the garment to replace (as CatVTON's cloth types)")  # fmt: skip
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
