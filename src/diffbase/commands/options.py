"""Options every model-running command shares: where it runs, in which precision, with which attention."""

from __future__ import annotations

import argparse
from typing import Any

DTYPE_CHOICES = ["float32", "float16", "bfloat16"]


def add_runtime_arguments(p: argparse.ArgumentParser, dtype_default: str = "float32", offload: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES, help=f"weights (default {dtype_default})")
    p.add_argument("--attention", default="auto", help="auto, flash, efficient, cudnn, math or a diffusers backend")
    if offload:
        p.add_argument(
            "--offload",
            default="none",
            choices=["none", "model", "sequential"],
            help="small GPUs: components (model) or layers (sequential) wait on the CPU between uses",
        )


def runtime(args: argparse.Namespace) -> dict[str, Any]:
    """device, dtype and offload for the loaders, with the device resolved and checked."""
    from diffbase.models.placement import resolve_device

    return {"device": resolve_device(args.device), "dtype": args.dtype, "offload": getattr(args, "offload", "none")}


def use_attention(args: argparse.Namespace, models: list[Any]) -> None:
    from diffbase.attention import apply_attention, choose
    from diffbase.models.placement import resolve_device

    apply_attention(choose(args.attention, resolve_device(args.device), "--attention"), models)


def save_result(image: Any, out: str, meta: dict[str, Any], grid: str | None = None,
                shown: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The result (atomically, with its settings in the PNG metadata) and, when asked, the inputs and the
    result side by side."""
    from pathlib import Path

    from diffbase.io import save_png_atomic

    save_png_atomic(image, Path(out), meta)
    print(f"wrote {out}")
    if grid:
        from diffbase.grid import side_by_side

        save_png_atomic(side_by_side((shown or {}) | {"result": image}), Path(grid))
        print(f"wrote {grid}")


def parse_box(text: str, what: str) -> tuple[int, int, int, int]:
    """`x0,y0,x1,y1` in pixels (a try-on garment box, a DreamO face box); `what` names the flag or field."""
    from diffbase.errors import UserError

    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{what}: expected x0,y0,x1,y1 in pixels, got '{text}'") from None
    return x0, y0, x1, y1
