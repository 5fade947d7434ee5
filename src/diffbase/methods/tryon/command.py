"""`diffbase tryon` (one person, one garment) and `diffbase eval tryon` (a dataset of pairs).
Heavy imports stay inside the commands, so `diffbase --help` stays fast."""

from __future__ import annotations

import argparse
from typing import Any

from diffbase.errors import UserError
from diffbase.interface import checks
from diffbase.interface.options import (
    LPIPS_HELP,
    HelpFormatter,
    add_output_arguments,
    add_runtime_arguments,
    eval_subparsers,
)


def settings_from(args: argparse.Namespace) -> Any:
    from diffbase.methods.tryon.mechanism.sampling import TryOnSettings

    return TryOnSettings(
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        seed=args.seed,
        prompt=args.prompt,
        repaint=not args.no_repaint,
        seed_mode=args.seed_mode,
    )


def check_sampling(args: argparse.Namespace) -> tuple[int, int]:
    """The model and sampling options `tryon` and `eval tryon` share, before the model loads."""
    checks.runtime(args)
    spec = checks.model_folder(args.model, family="sd15", job="try-on")
    checks.weights_file(args.weights, "--weights")
    checks.count(args.steps, "--steps")
    checks.number(args.guidance, "--guidance", low=0)
    checks.number(args.eta, "--eta", low=0)
    return checks.size(args.size, "--size", checks.size_multiple(spec))


def run_tryon(args: argparse.Namespace) -> None:
    from diffbase.interface.options import save_result
    from diffbase.methods.tryon.mechanism.data import box_mask
    from diffbase.methods.tryon.method import VTON

    if (args.mask is None) == (args.box is None):
        raise UserError("--mask / --box: give exactly one (the garment area on the person)")
    h, w = check_sampling(args)
    person, garment = checks.image(args.person, "--person"), checks.image(args.garment, "--garment")
    if args.mask == "auto":
        mask = None  # computed once everything else is checked
    elif args.mask:
        mask = checks.mask(args.mask, "--mask", person.size)
    else:
        mask = box_mask(person.size, checks.box(args.box, "--box", person.size))
    checks.output(args.out, "--out", [args.person, args.garment, args.mask], args.overwrite)
    checks.output(args.grid, "--grid", [args.person, args.garment, args.mask, args.out], args.overwrite)
    if mask is None:
        mask = auto_mask(args, person)
    bb = VTON.load(args.model, args.weights, args.method, **args.runtime.loader())
    args.runtime.use([bb.denoiser], backend=False)  # try-on's own attention processors stay
    settings = settings_from(args)
    inputs = {"person": person, "garment": garment, "mask": mask}
    result = VTON.run(bb, inputs, settings, (h, w), soften=args.soften_mask)
    meta = {
        "method": args.method,
        "model": args.model,
        "weights": args.weights,
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "seed": args.seed,
        "seed_mode": args.seed_mode,
        "soften_mask": args.soften_mask,
        "size": [h, w],
    }
    if args.mask == "auto":
        meta |= {"mask": "auto", "cloth_type": args.cloth_type, "parser": args.parser}
    save_result(result, args.out, meta, args.grid, {"person": person, "garment": garment})


def auto_mask(args: argparse.Namespace, person: Any) -> Any:
    """`--mask auto`: the garment area from the human parser (CatVTON's cloth types), saved beside --out."""
    from diffbase.data import preprocess_models as pm
    from diffbase.io import save_png_atomic

    path = pm.beside(args.out, "_mask.png", "--mask auto", args.overwrite)
    parsing = pm.load_parser(args.parser, "--parser", args.runtime.device)(person)
    mask = pm.auto_garment_mask(parsing, args.cloth_type)
    save_png_atomic(mask, path)
    print(f"wrote {path} (--mask auto, {args.cloth_type})")
    return mask


def run_eval(args: argparse.Namespace) -> None:
    from diffbase.grid import image_grid
    from diffbase.io import save_png_atomic, writable_folder, write_json_atomic
    from diffbase.methods.tryon.mechanism.data import TryOnDataset, read_tryon
    from diffbase.methods.tryon.mechanism.evaluate import run_pairs
    from diffbase.methods.tryon.method import VTON

    size = check_sampling(args)
    if args.limit is not None:
        checks.count(args.limit, "--limit")
    folder = writable_folder(args.out, "--out")
    lpips = None
    if args.lpips:  # read before the model loads: a wrong file costs nothing
        if args.unpaired:
            raise UserError("--lpips: LPIPS compares each result with its ground truth; --unpaired has none")
        from diffbase.metrics.lpips import model

        lpips = model(args.lpips, "--lpips")
    records = read_tryon(args.data, args.split, paired=not args.unpaired)
    dataset = TryOnDataset(records, size)
    bb = VTON.load(args.model, args.weights, args.method, **args.runtime.loader())
    args.runtime.use([bb.denoiser], backend=False)  # as `tryon` does: --attention's kernels, --compile's blocks
    out = run_pairs(bb, args.method, dataset, settings_from(args), limit=args.limit)
    header = ["person", "garment", "result", "ground truth"]
    save_png_atomic(image_grid(out["rows"][:16], header=header), folder / "grid.png")
    if args.features:  # CatVTON's protocol: the results against the test set's real photos, paired or not
        from diffbase.metrics import features, scores

        net = features.load(args.features, "--features")
        out["metrics"] |= scores.distribution(net, out["reals"], out["results"], "--features")
    if lpips is not None:
        from diffbase.metrics.lpips import mean_lpips

        out["metrics"]["lpips"] = mean_lpips(lpips, out["results"], out["reals"])
    report = {"pairs": out["count"], "paired": not args.unpaired, **out["metrics"]}
    report |= {"features": args.features} if args.features else {}
    write_json_atomic(folder / "metrics.json", report)
    print(f"{out['count']} pairs ({'unpaired' if args.unpaired else 'paired'})")
    for key, value in out["metrics"].items():
        print(f"  {key:<10} {value:.4f}")
    if args.unpaired:
        print("  unpaired pairs have no ground truth: SSIM, PSNR and masked error need paired data")
    if not args.features:
        print("  FID, KID: give --features (dino:DIR, clip:DIR or inception:FILE) to compute them")
    if not args.lpips and not args.unpaired:
        print("  LPIPS: give --lpips (squeeze:FILE, torchvision's SqueezeNet 1.1 weights, as CatVTON) to compute it")
    print(f"wrote {folder / 'grid.png'} and {folder / 'metrics.json'}")


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and sampling options `tryon` and `eval tryon` share."""
    p.add_argument(
        "--method",
        choices=["vton", "catvton"],
        default="vton",
        help="catvton: the released CatVTON weights on the inpainting UNet",
    )
    p.add_argument("--model", required=True, help="a local SD1.5 diffusers folder (the inpainting UNet for catvton)")
    p.add_argument("--weights", help="trained attention weights: a train run's vton/ folder or a CatVTON folder")
    p.add_argument("--size", default="512x384", help="HxW the model runs at")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=2.5, help="CFG scale (garment-zeroed branch)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--prompt", default="", help="vton variant only")
    p.add_argument("--no-repaint", action="store_true", help="keep the model's pixels outside the mask too")
    p.add_argument(
        "--seed-mode",
        choices=["diffbase", "catvton"],
        default="diffbase",
        help="catvton: VAE samples from the global generator seeded as CatVTON's scripts do (its numbers)",
    )
    add_runtime_arguments(p)


def add_parsers(sub: Any) -> None:
    t = sub.add_parser(
        "tryon",
        help="virtual try-on: a person, a mask (or box) and a garment",
        formatter_class=HelpFormatter,
    )
    model_arguments(t)
    t.add_argument("--person", required=True, help="the person photo")
    t.add_argument("--mask", help="the garment area on the person (white), or 'auto' (from --parser)")
    t.add_argument("--parser", help="--mask auto: a local human-parsing model folder (SegFormer, ATR / LIP labels)")
    t.add_argument("--cloth-type", choices=["upper", "lower", "overall"], default="upper",
                   help="--mask auto: the garment to replace (as CatVTON's cloth types)")  # fmt: skip
    t.add_argument("--box", help="or a box x0,y0,x1,y1 in the person's pixels")
    t.add_argument("--garment", required=True, help="the garment photo")
    t.add_argument("--soften-mask", action="store_true", help="blur the mask and binarise it again (CatVTON's app)")
    add_output_arguments(t, "also person | garment | result side by side")
    t.set_defaults(func=run_tryon)
    add_eval_parser(eval_subparsers(sub))


def add_eval_parser(sub: Any) -> None:
    e = sub.add_parser("tryon", help="try-on metrics on a dataset (SSIM, PSNR, masked L1; FID, KID) and a grid")
    model_arguments(e)
    e.add_argument("--data", required=True, help="VITON-HD or DressCode root, or a metadata.json")
    e.add_argument("--split", default="test")
    e.add_argument("--unpaired", action="store_true", help="garments other than the worn one (no ground truth)")
    e.add_argument("--limit", type=int, help="only the first N pairs")
    e.add_argument(
        "--features",
        help="KIND:PATH for FID and KID: dino:DIR, clip:DIR (transformers folders) or "
        "inception:FILE (FID's Inception weights; needs torch-fidelity and torchvision)",
    )
    e.add_argument("--lpips", help=LPIPS_HELP + " (paired runs)")
    e.add_argument("--out", default="outputs/eval_tryon")
    e.set_defaults(func=run_eval)
