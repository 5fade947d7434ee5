"""`diffbase customize`: DreamO on FLUX.1 with identity, subject, try-on and style references."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.interface import checks
from diffbase.interface.options import HelpFormatter, add_output_arguments, add_runtime_arguments


def parse_numbered(values: list[str], flag: str) -> dict[int, str]:
    """`N=VALUE` pairs (N: the 1-based reference slot)."""
    out = {}
    for value in values:
        slot, _, rest = value.partition("=")
        if not slot.isdigit() or not rest:
            raise UserError(f"{flag} {value}: expected N=VALUE with N the reference's slot (1, 2, ...)")
        out[int(slot)] = rest
    return out


def reference_slots(args: argparse.Namespace) -> list[tuple[Any, str, Any, Any] | None]:
    """(image, task, mask, face box) per `--ref IMG:TASK` in order; `--ref none` keeps a slot empty."""
    from diffbase.methods.dreamo.mechanism.conditions import MAX_REFERENCES, TASKS

    if len(args.ref) > MAX_REFERENCES:
        raise UserError(f"--ref: {len(args.ref)} references; DreamO takes at most {MAX_REFERENCES}")
    masks, boxes = parse_numbered(args.ref_mask, "--ref-mask"), parse_numbered(args.face_box, "--face-box")
    for slot in set(masks) | set(boxes):
        if not 1 <= slot <= len(args.ref):
            raise UserError(f"--ref-mask/--face-box: slot {slot} has no --ref (there are {len(args.ref)})")
    slots: list[tuple[Any, str, Any, Any] | None] = []
    for n, value in enumerate(args.ref, start=1):
        if value == "none":
            slots.append(None)
            continue
        path, _, task = value.rpartition(":")
        if not path or task not in TASKS:
            raise UserError(f"--ref {value}: expected IMAGE:TASK with TASK one of {', '.join(TASKS)}")
        image = checks.image(path, f"--ref {n}")
        if masks.get(n) == "auto" and not args.parser:
            raise UserError(f"--ref-mask {n}=auto: needs --parser, a local human-parsing model folder")
        if masks.get(n) == "auto":
            mask = "auto"  # computed once everything is checked (computed_masks)
        else:
            mask = checks.mask(masks[n], f"--ref-mask {n}", image.size) if n in masks else None
        box = checks.box(boxes[n], f"--face-box {n}", image.size) if n in boxes else None
        slots.append((image, task, mask, box))
    if not any(slots):
        raise UserError("--ref: give at least one reference image")
    return slots


TURBO_STEPS, PLAIN_STEPS = 12, 25  # the official app with Turbo; "the original 25 steps" without (its --no_turbo help)


def default_dtype(device: Any) -> str:
    """bfloat16 on CUDA, as the official app loads FLUX.1; float32 elsewhere (bfloat16 is slow or lossy on CPU)."""
    import torch

    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that follow other choices: --dtype the device, --steps Turbo, --guidance --version."""
    from diffbase.methods.dreamo.mechanism.files import recipe, turbo_file
    from diffbase.runtime import resolve_device

    if args.dtype is None:
        args.dtype = default_dtype(resolve_device(args.device))
    if args.guidance is None:
        args.guidance = recipe(args.version).guidance
    args.turbo_file = turbo_file(Path(args.dreamo), args.turbo, not args.no_turbo)
    if args.steps is None:
        args.steps = TURBO_STEPS if args.turbo_file is not None else PLAIN_STEPS


def check_numbers(args: argparse.Namespace) -> tuple[int, int]:
    from diffbase.methods.dreamo.mechanism.files import fusion_list

    fill_defaults(args)
    checks.runtime(args)
    checks.model_folder(args.model, family="flux1", job="DreamO")
    if not (Path(args.dreamo) / "dreamo.safetensors").is_file():
        raise UserError(f"--dreamo: {Path(args.dreamo) / 'dreamo.safetensors'}: no such file (expected the folder "
                        "of the DreamO weights)")  # fmt: skip
    for _, file, _, _ in fusion_list(Path(args.dreamo), args.version, args.turbo_file):  # found only once loaded
        if file is not None and not file.is_file():
            raise UserError(f"--dreamo: {file}: no such file (--version {args.version} fuses it; --version none "
                            "fuses dreamo.safetensors alone)")  # fmt: skip
    checks.count(args.steps, "--steps")
    checks.count(args.ref_res, "--ref-res", least=16)
    for value, name in ((args.guidance, "--guidance"), (args.first_step_guidance, "--first-step-guidance"),
                        (args.neg_guidance, "--neg-guidance")):  # fmt: skip
        checks.number(value, name, low=0)
    checks.number(args.true_cfg, "--true-cfg", low=1)
    if not 0 <= args.true_cfg_start <= args.true_cfg_end <= args.steps:
        raise UserError(f"--true-cfg-start / --true-cfg-end: expected 0 <= start <= end <= --steps ({args.steps}), "
                        f"got {args.true_cfg_start} and {args.true_cfg_end}")  # fmt: skip
    return checks.size(args.size, "--size", 16)


def run_customize(args: argparse.Namespace) -> None:
    from diffbase.interface.options import save_result
    from diffbase.methods.dreamo.mechanism.generate import DreamOSettings
    from diffbase.methods.dreamo.method import DREAMO, check_prompt

    h, w = check_numbers(args)  # everything is checked before the model loads
    slots = reference_slots(args)
    check_prompt(args.prompt, slots)
    inputs = [v.rpartition(":")[0] for v in args.ref]
    checks.output(args.out, "--out", inputs, args.overwrite)
    checks.output(args.grid, "--grid", [*inputs, args.out], args.overwrite)
    slots = computed_masks(args, slots)
    loaded = DREAMO.load(args.model, args.dreamo, args.version, args.turbo, not args.no_turbo,
                         **args.runtime.loader())  # fmt: skip
    args.runtime.use([loaded[0].transformer])
    settings = DreamOSettings(
        prompt=args.prompt, height=h, width=w, steps=args.steps, guidance=args.guidance, seed=args.seed,
        first_step_guidance=args.first_step_guidance, true_cfg=args.true_cfg, true_cfg_start=args.true_cfg_start,
        true_cfg_end=args.true_cfg_end, negative_prompt=args.negative_prompt, neg_guidance=args.neg_guidance,
        ref_noise=args.ref_noise,
    )  # fmt: skip
    image = DREAMO.run(loaded, {"references": slots, "resolution": args.ref_res}, settings)
    meta = {"prompt": settings.prompt, "model": args.model, "dreamo": args.dreamo, "version": args.version,
            "references": args.ref, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
            "size": [h, w], "ref_res": args.ref_res, "ref_noise": args.ref_noise, "dtype": args.dtype,
            "turbo": str(args.turbo_file) if args.turbo_file else None}  # fmt: skip
    if any(m.endswith("=auto") for m in args.ref_mask):
        meta |= {"ref_masks": args.ref_mask, "parser": args.parser}
    shown = {f"ref {n} ({s[1]})": s[0] for n, s in enumerate(slots, start=1) if s is not None}
    save_result(image, args.out, meta, args.grid, shown)


def computed_masks(args: argparse.Namespace, slots: list[Any]) -> list[Any]:
    """`--ref-mask N=auto`: reference N's subject as the human parser's foreground (people and clothes), saved
    beside --out as OUT_refN_mask.png."""
    auto = [n for n, slot in enumerate(slots, start=1) if slot is not None and isinstance(slot[2], str)]  # "auto"
    if not auto:
        return slots
    from diffbase.data import preprocess_models as pm
    from diffbase.io import save_png_atomic

    files = {n: pm.beside(args.out, f"_ref{n}_mask.png", f"--ref-mask {n}=auto", args.overwrite) for n in auto}
    parser, slots = pm.load_parser(args.parser, "--parser", args.runtime.device), list(slots)
    for n in auto:
        image, task, _, box = slots[n - 1]
        mask = pm.auto_subject_mask(parser(image), f"--ref-mask {n}=auto")
        save_png_atomic(mask, files[n])
        print(f"wrote {files[n]} (--ref-mask {n}=auto)")
        slots[n - 1] = (image, task, mask, box)
    return slots


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "dreamo",
        aliases=["customize"],
        help="DreamO on FLUX.1: identity (id), subject (ip), try-on and style references",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="a local FLUX.1 dev diffusers folder")
    p.add_argument("--dreamo", required=True, help="a folder with dreamo.safetensors (and the recipe's LoRAs)")
    p.add_argument("--version", default="v1.1", choices=["v1.1", "v1", "none"],
                   help="v1.1: the official fusion recipe; v1: as the official app, the same LoRAs at guidance 3.5; "
                        "none: dreamo.safetensors alone (trained here)")  # fmt: skip
    turbo = p.add_mutually_exclusive_group()
    turbo.add_argument("--turbo", metavar="FILE",
                       help="the FLUX.1-Turbo-Alpha LoRA, fused at weight 1, third as the official code does "
                            "(default: --dreamo's diffusion_pytorch_model.safetensors when present)")  # fmt: skip
    turbo.add_argument("--no-turbo", action="store_true", help="fuse no Turbo LoRA (as the official --no_turbo)")
    p.add_argument("--ref", action="append", default=[], required=True, metavar="IMG:TASK",
                   help="a reference and its task (ip, id, style, tryon), in slot order; 'none' for an empty slot")  # fmt: skip
    p.add_argument("--ref-mask", action="append", default=[], metavar="N=MASK",
                   help="ip/tryon: the subject's mask for reference N (background made white); N=auto: from --parser")  # fmt: skip
    p.add_argument("--parser", help="--ref-mask N=auto: a local human-parsing model folder (SegFormer); its "
                   "foreground (people, clothes) is the subject")  # fmt: skip
    p.add_argument("--face-box", action="append", default=[], metavar="N=x0,y0,x1,y1",
                   help="id: the face box in reference N (default: its centre square)")  # fmt: skip
    p.add_argument("--ref-res", type=int, default=512, help="reference resolution (by area)")
    p.add_argument("--prompt", required=True, help="use [ref#1], [ref#2], ... to name the references")
    p.add_argument("--size", default="1024x1024", help="HxW")
    p.add_argument("--steps", type=int, help="sampling steps (default: 12 with Turbo, 25 without, as the official)")
    p.add_argument("--guidance", type=float, help="FLUX guidance value (default: 4.5; 3.5 with --version v1)")
    p.add_argument("--first-step-guidance", type=float, default=0.0, help="the first step's guidance (0: --guidance)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--true-cfg", type=float, default=1.0, help="> 1: true CFG on steps [start, end)")
    p.add_argument("--true-cfg-start", type=int, default=0, help="the first step of true CFG")
    p.add_argument("--true-cfg-end", type=int, default=0, help="the step true CFG ends before")
    p.add_argument("--negative-prompt", default="", help="true CFG's negative prompt")
    p.add_argument("--neg-guidance", type=float, default=3.5, help="the negative branch's guidance value")
    p.add_argument("--ref-noise", default="official", choices=["official", "seeded"],
                   help="the references' VAE sample: official (the official pipeline's global-RNG draw, seeded "
                        "with --seed here) or seeded (a CPU generator seeded --seed + 1, as before)")  # fmt: skip
    add_runtime_arguments(p)
    p.set_defaults(dtype=None)  # default_dtype: bfloat16 on CUDA (as the official app), float32 on CPU
    next(a for a in p._actions if a.dest == "dtype").help = "weights (default: bfloat16 on CUDA, float32 otherwise)"
    add_output_arguments(p, "also the references and the result side by side")
    p.set_defaults(func=run_customize)
