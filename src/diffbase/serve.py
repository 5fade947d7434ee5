"""`diffbase serve`: a Gradio app over the methods' inference API (the same load/run the CLI calls).

Tabs: try-on (VTON / CatVTON, DreamFit try-on), DreamFit garment and pose generation, DreamO
customization, Kontext edit and Fill inpainting, upscaling, and a training monitor (loss plot and latest
validation grid of a `diffbase train` output folder). Models are local folders; the defaults are the
shipped toy zoo, so the app runs on any machine.

Safety: it binds to 127.0.0.1 unless told otherwise; uploads are limited in bytes (the server refuses
larger ones) and in pixels (checked from the header before decoding, so a decompression bomb never
decodes); upload names are never used as paths (only the server's own temporary copies are read); one
queue with a single worker, and a lock around the models, so two requests never run a model at once;
bad input shows as an error in the page and the server keeps serving.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import (  # noqa: F401  (the app's pieces, as tests and users import them from here)
    FLAGS,
    ZOO,
    App,
    Defaults,
    Limits,
    Models,
    Request,
    checked_image,
    checked_mask,
    checked_size,
    guarded,
    relabel,
)


def loss_view(folder: str) -> tuple[Image.Image, Image.Image | None, str]:
    """(loss plot, latest validation grid or None, a status line) of a training output folder."""
    from diffbase.plot import line_plot
    from diffbase.training.metrics import read_metrics

    out = Path(folder)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{out}: no metrics.jsonl (a `diffbase train` output folder has one once training starts)")
    rows = read_metrics(metrics)  # a line a live run is still writing is left out
    names = sorted({k for r in rows for k in r if k == "loss" or k.startswith("val_")})
    series = {n: [(r["step"], r[n]) for r in rows if n in r] for n in names}
    plot = line_plot({k: v for k, v in series.items() if v}, title=f"{out.name}: loss by step")
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    grid = Image.open(grids[-1]).convert("RGB") if grids else None
    last = max((r["step"] for r in rows if "step" in r), default=0)
    return plot, grid, f"step {last}; {len(grids)} validation grid(s)" + (f", latest {grids[-1].name}" if grids else "")


def monitor_tab(app: App) -> None:
    import gradio as gr

    def monitor(folder: str) -> tuple[Image.Image, Image.Image | None, str]:
        try:
            return loss_view(folder)
        except UserError as err:
            raise gr.Error(str(err)) from None

    with gr.Tab("Training monitor"):
        folder = gr.Textbox(label="a `diffbase train` output folder", value="outputs/demo/run")
        refresh = gr.Button("Refresh")
        status = gr.Markdown()
        with gr.Row():
            plot, grid = (
                gr.Image(label="loss", type="pil", format="png"),
                gr.Image(label="latest validation grid", type="pil", format="png"),
            )
        refresh.click(monitor, folder, [plot, grid, status])
        timer = gr.Timer(10.0, active=False)
        live = gr.Checkbox(label="refresh every 10 s", value=False)
        live.change(lambda on: gr.Timer(active=on), live, timer)
        timer.tick(monitor, folder, [plot, grid, status])


def tabs() -> list[Callable[[App], None]]:
    """Every method package's tab (its ui.py), in the methods' order, then the training monitor."""
    from diffbase import methods

    found = [methods.part(package, "ui") for package in methods.packages()]
    return [ui.tab for ui in found if ui is not None] + [monitor_tab]


def build_app(defaults: Defaults, limits: Limits) -> Any:
    import gradio as gr

    from diffbase.runtime import resolve

    rt = resolve(defaults.device, defaults.dtype, defaults.attention, defaults.offload, quantize=defaults.quantize,
                 offload_blocks=defaults.offload_blocks)  # once, every tab  # fmt: skip
    rt.use_attention([])  # the process's SDPA kernels (a diffusers backend name needs the models: the CLI's)
    app = App(defaults, limits, Models(), rt, gr.Progress(track_tqdm=True))
    with gr.Blocks(title="diffbase") as blocks:
        gr.Markdown("# diffbase\nLocal models only; the defaults are the shipped toy models (tiny, CPU-friendly).")
        for tab in tabs():
            tab(app)
    blocks.queue(default_concurrency_limit=1, max_size=16)
    return blocks


def serve(host: str = "127.0.0.1", port: int = 7860, defaults: Defaults | None = None, limits: Limits | None = None,
          block: bool = True) -> Any:  # fmt: skip
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("diffbase serve needs gradio: pip install 'diffbase[ui]'") from None
    limits = limits or Limits()
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # decoding anything larger fails (header checks come first)
    app = build_app(defaults or Defaults(), limits)
    print(f"diffbase web UI on http://{host}:{port} (uploads up to {limits.max_bytes / 2**20:.0f} MB, "
          f"{limits.max_pixels} pixels)", flush=True)  # fmt: skip
    app.launch(server_name=host, server_port=port, max_file_size=limits.max_bytes, prevent_thread_lock=not block,
               show_error=True, quiet=True, ssr_mode=False)  # fmt: skip
    return app


def run_serve(args: argparse.Namespace) -> None:
    if min(args.max_upload_mb, args.max_pixels, args.max_seconds, args.max_tiles) <= 0:
        raise UserError("--max-upload-mb / --max-pixels / --max-seconds / --max-tiles: expected positive limits")
    defaults = Defaults(tryon_weights=args.tryon_weights or "", device=args.device, dtype=args.dtype,
                        attention=args.attention, quantize=args.quantize, offload=args.offload,
                        offload_blocks=args.offload_blocks)  # fmt: skip
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_seconds, args.max_tiles)
    serve(args.host, args.port, defaults, limits)


def add_parsers(sub: Any) -> None:
    """`diffbase serve` and its flags."""
    from diffbase.runtime import add_arguments

    web = sub.add_parser("serve", help="the web UI (Gradio): try-on, DreamFit, DreamO, edit, upscale, training monitor")
    web.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it to your network)")
    web.add_argument("--port", type=int, default=7860)
    add_arguments(web)
    web.add_argument("--tryon-weights", help="the try-on tab's default weights (e.g. outputs/demo/run/vton)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="uploads larger than this are refused")
    web.add_argument("--max-pixels", type=int, default=4096 * 4096, help="images with more pixels are refused")
    web.add_argument("--max-seconds", type=float, default=600.0, help="one request's time limit (it stops at a step)")
    web.add_argument("--max-tiles", type=int, default=64, help="the upscale tab's limit on tiles per request")
    web.set_defaults(func=run_serve)
