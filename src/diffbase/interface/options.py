"""Options every model-running command shares: where it runs, in which precision, with which attention."""

from __future__ import annotations

import argparse
from typing import Any

LPIPS_HELP = ("NET:FILE, LPIPS over torchvision's weights file of NET (squeeze, alex or vgg): "
              "squeeze:/models/squeezenet1_1-b8a52dc0.pth is CatVTON's")  # fmt: skip


class HelpFormatter(argparse.HelpFormatter):
    """Says each default once: appends `(default: X)` where the help text does not already speak of the
    default and there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def add_runtime_arguments(p: argparse.ArgumentParser, dtype_default: str = "float32", offload: bool = True) -> None:
    """The runtime's flags (diffbase.runtime) and --quiet, for a command that runs a model."""
    from diffbase.runtime import add_arguments

    add_arguments(p, dtype_default, offload)
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when not a terminal)")


def add_output_arguments(p: argparse.ArgumentParser, grid_help: str) -> None:
    """--out (PNG, JPEG or WebP), --grid and --overwrite, the same for every command that writes one image."""
    p.add_argument("--out", required=True, help="the result: .png (with its settings), .jpg or .webp")
    p.add_argument("--grid", metavar="GRID.png", help=grid_help)
    p.add_argument("--overwrite", action="store_true", help="replace --out / --grid when they exist")


def save_result(image: Any, out: str, meta: dict[str, Any], grid: str | None = None,
                shown: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The result (atomically, with its settings in the PNG metadata) and, when asked, the inputs and the
    result side by side."""
    from pathlib import Path

    from diffbase.io import save_image_atomic

    save_image_atomic(image, Path(out), meta)
    print(f"wrote {out}")
    if grid:
        from diffbase.grid import side_by_side

        save_image_atomic(side_by_side((shown or {}) | {"result": image}), Path(grid))
        print(f"wrote {grid}")


def eval_subparsers(sub: Any) -> Any:
    """The subcommands of `diffbase eval`, made by whichever command module comes first (the generic ones in
    diffbase.commands.evaluate, a method's own such as `eval tryon`)."""
    holder = sub.choices.get("eval")
    if holder is None:
        holder = sub.add_parser("eval", help="metrics a paper would print (SSIM, PSNR, FID, KID, CLIP, DINO)")
        holder.set_defaults(eval_sub=holder.add_subparsers(dest="what", required=True, metavar="WHAT"))
    return holder.get_default("eval_sub")
