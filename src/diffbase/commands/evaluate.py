"""`diffbase eval images | customize | generate`: the metrics of diffbase.metrics over folders of images, printed
as a table and written to a metrics.json. Feature networks come from local paths; nothing is downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.interface.options import LPIPS_HELP, HelpFormatter, eval_subparsers

FEATURES_HELP = "KIND:PATH, the network of FID and KID: dino:DIR or clip:DIR (transformers folders), inception:FILE"


def add_parsers(sub: Any) -> None:
    ev = eval_subparsers(sub)
    i = ev.add_parser("images", help="generated images against real ones: SSIM, PSNR (same names), FID, KID",
                      formatter_class=HelpFormatter)  # fmt: skip
    i.add_argument("--real", required=True, help="folder of real images (ground truth where names match)")
    i.add_argument("--fake", required=True, help="folder of generated images")
    i.add_argument("--features", help=FEATURES_HELP)
    i.add_argument("--lpips", help=LPIPS_HELP + " (pairs of the same name)")
    i.add_argument("--out", default="outputs/eval_images")
    i.set_defaults(func=run_images)
    c = ev.add_parser("customize", help="DreamO-style results: CLIP-I and DINO against references, CLIP-T against "
                      "prompts, face similarity (insightface) and style similarity (CLIP-I against style references); "
                      "per task when the results folder has a subfolder per task",
                      formatter_class=HelpFormatter)  # fmt: skip
    c.add_argument("--results", required=True, help="generated images (or a subfolder per task: ip, id, style, ...)")
    c.add_argument("--references", required=True, help="reference images, named as the results (or one for all)")
    c.add_argument("--prompts", help="a text file, one prompt per result in name order (or <name>.txt beside each)")
    c.add_argument("--clip", required=True, help="a local CLIP folder (model, processor, tokenizer)")
    c.add_argument("--dino", help="a local DINO / DINOv2 folder (model and image processor)")
    c.add_argument("--face", help="a local insightface model pack (antelopev2, buffalo_l: a SCRFD detector and an "
                   "ArcFace ONNX): face similarity of each result's largest face with its reference's")  # fmt: skip
    c.add_argument("--style", help="style reference images, named as the results (or one for all; with task "
                   "subfolders, DIR/<task>): style similarity as CLIP-I (--clip), not CSD")  # fmt: skip
    c.add_argument("--out", default="outputs/eval_customize")
    c.set_defaults(func=run_customize)
    g = ev.add_parser("generate", help="text-to-image results: CLIP score against prompts; FID / KID given real "
                      "images", formatter_class=HelpFormatter)  # fmt: skip
    g.add_argument("--results", required=True, help="generated images")
    g.add_argument("--prompts", required=True, help="a text file, one prompt per result in name order")
    g.add_argument("--clip", required=True, help="a local CLIP folder (model, processor, tokenizer)")
    g.add_argument("--real", help="a reference set of real images for FID / KID (with --features)")
    g.add_argument("--features", help=FEATURES_HELP)
    g.add_argument("--out", default="outputs/eval_generate")
    g.set_defaults(func=run_generate)


def run_images(args: argparse.Namespace) -> None:
    from diffbase.io import writable_folder
    from diffbase.metrics import images

    real, fake = images.image_files(args.real, "--real"), images.image_files(args.fake, "--fake")
    writable_folder(args.out, "--out")
    lpips = None
    if args.lpips:
        from diffbase.metrics.lpips import model

        lpips = model(args.lpips, "--lpips")
    report: dict[str, Any] = {"real": len(real), "fake": len(fake)}
    paired = {p.stem for p in real} <= {p.stem for p in fake}
    if paired or not args.features or lpips is not None:  # without features: paired or nothing
        report |= paired_scores(images.paired(real, fake, "--real", "--fake"), lpips)
    if args.features:
        report |= distribution_scores(args.features, real, fake)
    finish(report, Path(args.out))


def paired_scores(pairs: list[tuple[Path, Path]], lpips_model: Any = None) -> dict[str, float]:
    """Mean SSIM and PSNR (and LPIPS, given its model) of each generated image against the real one of its name."""
    from diffbase.metrics import images, scores

    rows = []
    for real_file, fake_file in pairs:
        real, fake = images.read([real_file])[0], images.read([fake_file])[0]
        images.same_size(real, fake, (real_file, fake_file))
        rows.append(scores.paired(fake, real, lpips_model))
    return scores.means(rows)


def distribution_scores(spec: str, real: list[Path], fake: list[Path], key: str = "--features") -> dict[str, Any]:
    """FID and KID of the two sets in the named network's features."""
    from diffbase.metrics import features, images, scores

    scores.check_counts(len(real), len(fake), key)
    return {
        "features": spec,
        **scores.distribution(features.load(spec, key), images.read(real), images.read(fake), key),
    }


def prompts_for(files: list[Path], prompts: str | None, key: str = "--prompts") -> list[str] | None:
    """One prompt per image: the lines of a text file in name order, or `<name>.txt` beside each image."""
    if prompts:
        from diffbase.commands.generate import read_prompts

        lines = read_prompts(prompts)
        if len(lines) != len(files):
            raise UserError(f"{key}: {prompts}: {len(lines)} prompts for {len(files)} images; give one per image")
        return lines
    beside = [f.with_suffix(".txt") for f in files]
    return [p.read_text(encoding="utf-8").strip() for p in beside] if all(p.is_file() for p in beside) else None


def references_for(results: list[Path], folder: Path, key: str = "--references") -> list[Path]:
    """The reference of each result: the one of its name, or the folder's only image for all."""
    from diffbase.metrics import images

    refs = images.image_files(folder, key)
    if len(refs) == 1:
        return refs * len(results)
    return [ref for _, ref in images.paired(results, refs, "--results", key)]


def run_customize(args: argparse.Namespace) -> None:
    from diffbase.io import writable_folder
    from diffbase.metrics import features, images

    writable_folder(args.out, "--out")
    root = Path(args.results)
    tasks = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if args.style and tasks and not any((Path(args.style) / t.name).is_dir() for t in tasks):
        raise UserError(f"--style: {args.style}: no subfolder named after a task ({', '.join(t.name for t in tasks)}); "
                        "with task subfolders, the style references go in DIR/<task>")  # fmt: skip
    inputs = {}  # every file of every task, checked before any model loads
    for task in tasks or [root]:
        results = images.image_files(task, "--results")
        refs = Path(args.references) / task.name if tasks else Path(args.references)
        styles = (Path(args.style) / task.name if tasks else Path(args.style)) if args.style else None
        inputs[task.name if tasks else "all"] = (
            results,
            references_for(results, refs),
            prompts_for(results, None if tasks or not args.prompts else args.prompts),
            references_for(results, styles, "--style") if styles and (styles.is_dir() or not tasks) else None,
        )
    face = None
    if args.face:
        from diffbase.metrics import faces

        face = faces.load(args.face, "--face")
    clip = features.clip_for_scores(args.clip)
    dino = features.load(f"dino:{args.dino}", "--dino") if args.dino else None
    report = {name: similarity(*files, clip, dino, face) for name, files in inputs.items()}
    finish(report, Path(args.out))


def similarity(results: list[Path], refs: list[Path], prompts: list[str] | None, styles: list[Path] | None,
               clip: Any, dino: Any, face: Any = None) -> dict:  # fmt: skip
    """CLIP-I and DINO of each result against its reference, CLIP-T against its prompt, face similarity of the
    largest faces of each result and its reference, CLIP-I against its style reference (means)."""
    from diffbase.metrics import images, scores

    fakes, real = images.read(results), images.read(refs)
    out = {"images": len(fakes), "clip_i": scores.mean_clip_score(clip, fakes, real)}
    if dino is not None:
        out["dino"] = scores.dino_score(dino, fakes, real)
    if prompts is not None:
        out["clip_t"] = scores.mean_clip_score(clip, fakes, prompts)
    if face is not None:
        from diffbase.metrics import faces

        unique = list(dict.fromkeys(refs))  # one reference for all is embedded once
        by_ref = dict(zip(unique, faces.embeddings(face, [real[refs.index(p)] for p in unique]), strict=True))
        out |= faces.similarity(faces.embeddings(face, fakes), [by_ref[p] for p in refs])
    if styles is not None:
        out["style_clip_i"] = scores.mean_clip_score(clip, fakes, images.read(styles))
    return out


def run_generate(args: argparse.Namespace) -> None:
    from diffbase.io import writable_folder
    from diffbase.metrics import features, images, scores

    results = images.image_files(args.results, "--results")
    writable_folder(args.out, "--out")
    prompts = prompts_for(results, args.prompts)
    report: dict[str, Any] = {"images": len(results)}
    report["clip_t"] = scores.mean_clip_score(features.clip_for_scores(args.clip), images.read(results), prompts)
    if args.real or args.features:
        if not (args.real and args.features):
            raise UserError("--real and --features: FID and KID need both (the real set and the network)")
        report |= distribution_scores(args.features, images.image_files(args.real, "--real"), results)
    finish(report, Path(args.out))


def finish(report: dict[str, Any], folder: Path) -> None:
    """The numbers as a table on stdout and in metrics.json."""
    from diffbase.config import dotted
    from diffbase.io import write_json_atomic

    write_json_atomic(folder / "metrics.json", report)
    for key, value in dotted(report).items():
        print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")
    print(f"wrote {folder / 'metrics.json'}")
