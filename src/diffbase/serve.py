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
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffbase.errors import UserError

ZOO = Path(__file__).resolve().parent / "zoo_weights"


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_seconds: float = 600.0  # one request's run time; past it the work stops at its next step
    max_tiles: int = 64  # the upscale tab's limit


@dataclass(frozen=True)
class Defaults:
    """What the tabs start with: the toy zoo, and the demo's trained try-on weights when present."""

    sd15: str = str(ZOO / "sd15-toy")
    flux1: str = str(ZOO / "flux1-toy")
    tryon_weights: str = ""
    device: str = "auto"
    dtype: str = "float32"
    attention: str = "auto"


class Models:
    """The last loaded model per key (one at a time: loading another frees the previous one), and the lock
    that lets one request at a time run a model."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if self.key != key:
            self.key, self.value = None, None
            self.value, self.key = load(), key
        return self.value


# The command flag each field stands for, so errors from the shared checks and loaders name the field.
FLAGS = {"SD1.5 model folder": "--model", "FLUX.1 model folder": "--model", "Kontext, FLUX.2 or Fill model folder":
         "--model", "trained attention weights (a run's vton/ folder)": "--weights", "DreamFit checkpoint":
         "--checkpoint", "DreamO folder": "--dreamo", "method": "--method", "mode": "--mode"}  # fmt: skip


def checked_size(text: str, multiple: int, limits: Limits) -> tuple[int, int]:
    """The HxW field: the family's multiple, and no more pixels than this server's limit."""
    from diffbase.commands import checks

    h, w = checks.size(text, "HxW", multiple)
    if h * w > limits.max_pixels:
        raise UserError(f"HxW: {h}x{w} is beyond this server's limit of {limits.max_pixels} pixels")
    return h, w


def checked_image(path: str | None, what: str, limits: Limits) -> Image.Image:
    """An upload (the server's temporary copy) as RGB, refused before decoding when it is too many bytes or
    pixels; the same checks as the commands', named by the field's label."""
    from diffbase.commands import checks

    if not path:
        raise UserError(f"{what}: upload an image")
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"{what}: {size / 2**20:.1f} MB is more than the {limits.max_bytes / 2**20:.0f} MB limit")
    return checks.image(path, what, max_pixels=limits.max_pixels, show_path=False)


def checked_mask(path: str | None, what: str, limits: Limits, image: Image.Image) -> Image.Image:
    from diffbase.commands import checks

    if not path:
        raise UserError(f"{what}: upload a mask")
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"{what}: {size / 2**20:.1f} MB is more than the {limits.max_bytes / 2**20:.0f} MB limit")
    return checks.mask(path, what, image.size, show_path=False)


class Request:
    """The running request's stop conditions: the Stop button and the per-request time limit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.cancel = threading.Event()
        self.deadline = 0.0

    def reason(self) -> str | None:
        import time

        if self.cancel.is_set():
            return "stopped (the Stop button)"
        if time.monotonic() > self.deadline:
            return f"stopped: the request ran past the {self.limits.max_seconds:g} s limit"
        return None


def relabel(message: str, labels: dict[str, str]) -> str:
    """An error from the commands' shared code, its leading flag (`--weights: ...`) named as the tab's field."""
    for flag, label in labels.items():
        if message.startswith((f"{flag}:", f"{flag} ")):
            return label + message[len(flag) :]
    return message


def guarded(
    fn: Callable[..., Any], models: Models, request: Request, labels: dict[str, str] | None = None
) -> Callable[..., Any]:
    """Runs `fn` under the model lock and the request's stop conditions (checked at every sampling step); a
    UserError (or any failure) becomes an error shown in the page, named by the field's label."""
    import time

    import gradio as gr

    from diffbase import progress

    @functools.wraps(fn)  # gradio reads the signature (its progress argument) through the wrapper
    def run(*args: Any, **kwargs: Any) -> Any:
        with models.lock:
            request.cancel.clear()
            request.deadline = time.monotonic() + request.limits.max_seconds
            try:
                with progress.stop_when(request.reason):
                    return fn(*args, **kwargs)
            except UserError as err:
                raise gr.Error(relabel(str(err), labels or {})) from None
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001  (the server keeps serving; the page says what failed)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise gr.Error(f"{type(err).__name__}: {first}") from None

    return run


def default_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A torso-sized box in the middle of the person, when neither a mask nor a box is given."""
    w, h = size
    return round(0.2 * w), round(0.22 * h), round(0.8 * w), round(0.62 * h)


def parse_box(text: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    from diffbase.commands import checks

    return checks.box(text, "garment box", size) if text.strip() else default_box(size)


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


@dataclass
class App:
    """What every tab shares: the defaults and limits, the loaded model and its lock, the runtime (resolved
    once) and the helpers that lay out a tab's uploads, fields and buttons."""

    defaults: Defaults
    limits: Limits
    models: Models
    rt: Any
    tracked: Any  # gradio fills in a progress bar where a function takes one

    def upload(self, label: str, elem_id: str) -> Any:
        import gradio as gr

        return gr.File(label=label, file_types=["image"], type="filepath", elem_id=elem_id)

    def sampling(self, size: str | None, steps: int) -> tuple[Any, Any, Any]:
        """The HxW (None: the tab takes the size from its input), steps and seed fields of a generating tab."""
        import gradio as gr

        hw = gr.Textbox(label="HxW", value=size) if size is not None else None
        return hw, gr.Number(label="steps", value=steps, precision=0), gr.Number(label="seed", value=0, precision=0)

    def action(self, label: str, prefix: str | None = None) -> tuple[Any, Any]:
        """The run and stop buttons and the result image."""
        import gradio as gr

        with gr.Row():
            run = gr.Button(label, variant="primary", elem_id=f"{prefix}-run" if prefix else None)
            stop = gr.Button(
                "Stop", variant="stop", scale=0, min_width=160, elem_id=f"{prefix}-stop" if prefix else None
            )
        return (run, stop), gr.Image(label="result", type="pil", format="png",
                                     elem_id=f"{prefix}-result" if prefix else None)  # fmt: skip

    def wire(self, buttons: tuple[Any, Any], fn: Callable[..., Any], inputs: list[Any], output: Any) -> None:
        """Run `fn` on the button (one request at a time, stopped at the time limit); Stop ends it at its next step.
        Errors that name a command's flag name the input's label instead."""
        run, stop = buttons
        labels = {FLAGS[c.label]: c.label for c in inputs if getattr(c, "label", None) in FLAGS}
        request = Request(self.limits)  # this tab's: its Stop stops its own work, not another tab's
        event = run.click(guarded(fn, self.models, request, labels), inputs, output, concurrency_id="model",
                          concurrency_limit=1)  # every tab in one queue: one request runs at a time  # fmt: skip
        stop.click(request.cancel.set, None, None, queue=False, cancels=[event])


def tryon_tab(app: App) -> None:
    import gradio as gr

    def tryon(person: str, garment: str, mask: str | None, box: str, method: str, model: str, weights: str,
              size: str, steps: int, seed: int, progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.commands import checks
        from diffbase.methods.vton import VTON
        from diffbase.tryon.data import box_mask
        from diffbase.tryon.sampling import TryOnSettings

        h, w = checked_size(size, 8, app.limits)
        checks.count(steps, "steps")
        person_img = checked_image(person, "person", app.limits)
        garment_img = checked_image(garment, "garment", app.limits)
        mask_img = checked_mask(mask, "mask (optional)", app.limits, person_img) if mask else box_mask(
            person_img.size, parse_box(box, person_img.size))  # fmt: skip
        progress(0, desc="loading the model")
        bb = app.models.get(("tryon", model, weights, method),
                        lambda: VTON.load(model, weights or None, method, **app.rt.loader()))  # fmt: skip
        progress(0.1, desc="sampling")
        settings = TryOnSettings(steps=int(steps), seed=int(seed))
        return VTON.run(bb, {"person": person_img, "garment": garment_img, "mask": mask_img}, settings, (h, w))

    with gr.Tab("Try-on"):
        with gr.Row():
            person, garment, mask = (
                app.upload("person", "tryon-person"),
                app.upload("garment", "tryon-garment"),
                app.upload("mask (optional)", "tryon-mask"),
            )
        with gr.Row():
            box = gr.Textbox(label="garment box x0,y0,x1,y1 (empty: the middle of the person)", value="")
            method = gr.Radio(["catvton", "vton"], value="catvton", label="method")
            model = gr.Textbox(label="SD1.5 model folder", value=app.defaults.sd15)
            weights = gr.Textbox(
                label="trained attention weights (a run's vton/ folder)", value=app.defaults.tryon_weights
            )
        with gr.Row():
            size, steps, seed = app.sampling("64x48", 20)
        run, result = app.action("Try on", "tryon")
        app.wire(run, tryon, [person, garment, mask, box, method, model, weights, size, steps, seed], result)


def dreamfit_tab(app: App) -> None:
    import gradio as gr

    def dreamfit(mode: str, garment: str, person: str | None, mask: str | None, pose: str | None, prompt: str,
                 model: str, checkpoint: str, size: str, steps: int, seed: int,
                 progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.commands import checks
        from diffbase.dreamfit.generate import DreamFitSettings
        from diffbase.methods.dreamfit import DREAMFIT

        if not checkpoint:
            raise UserError("DreamFit checkpoint: give a DreamFit checkpoint file (official .bin or one trained here)")
        checks.weights_file(checkpoint, "DreamFit checkpoint")
        h, w = checked_size(size, 16, app.limits)
        checks.count(steps, "steps")
        inputs: dict[str, Any] = {"garment": checked_image(garment, "garment", app.limits)}
        if pose:
            inputs["pose"] = checked_image(pose, "pose image", app.limits)
        if mode == "tryon":
            inputs["person"] = checked_image(person, "person (try-on)", app.limits)
            inputs["mask"] = checked_mask(mask, "mask (try-on)", app.limits, inputs["person"])
        progress(0, desc="loading the model")
        loaded = app.models.get(("dreamfit", model, checkpoint),
                            lambda: DREAMFIT.load(model, checkpoint, **app.rt.loader()))  # fmt: skip
        steps_progress.pipeline(loaded[0], "dreamfit", show=True)
        settings = DreamFitSettings(prompt=prompt, mode=mode, steps=int(steps), seed=int(seed), height=h, width=w)
        return DREAMFIT.run(loaded, inputs, settings)

    with gr.Tab("DreamFit"):
        with gr.Row():
            mode = gr.Radio(["garment", "pose", "tryon"], value="garment", label="mode")
            f_garment, f_person, f_mask, f_pose = (app.upload("garment", "df-garment"), app.upload("person (try-on)", "df-person"),
                                                   app.upload("mask (try-on)", "df-mask"), app.upload("pose image (pose, optional for try-on)", "df-pose"))  # fmt: skip
        f_prompt = gr.Textbox(label="prompt", value="a person")
        with gr.Row():
            f_model, f_ckpt = (
                gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1),
                gr.Textbox(label="DreamFit checkpoint", value=""),
            )
            f_size, f_steps, f_seed = app.sampling("32x32", 20)
        f_run, f_result = app.action("Generate")
        app.wire(f_run, dreamfit,
             [mode, f_garment, f_person, f_mask, f_pose, f_prompt, f_model, f_ckpt, f_size, f_steps, f_seed],
             f_result)  # fmt: skip


def dreamo_tab(app: App) -> None:
    import gradio as gr

    def customize(ref1: str | None, task1: str, ref2: str | None, task2: str, prompt: str, model: str, dreamo: str,
                  version: str, size: str, steps: int, seed: int,
                  progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.commands import checks
        from diffbase.commands.customize import check_prompt
        from diffbase.dreamo.generate import DreamOSettings
        from diffbase.methods.dreamo import DREAMO

        h, w = checked_size(size, 16, app.limits)
        checks.count(steps, "steps")
        slots = [(checked_image(r, f"reference {k}", app.limits), t, None, None) if r else None
                 for k, (r, t) in enumerate(((ref1, task1), (ref2, task2)), start=1)]  # fmt: skip
        if not any(slots):
            raise UserError("references: upload at least one")
        check_prompt(prompt, slots, "prompt")
        loaded = app.models.get(("dreamo", model, dreamo, version),
                            lambda: DREAMO.load(model, dreamo, version, **app.rt.loader()))  # fmt: skip
        settings = DreamOSettings(prompt=prompt, height=h, width=w, steps=int(steps), seed=int(seed))
        return DREAMO.run(loaded, {"references": slots}, settings)

    with gr.Tab("DreamO"):
        tasks = ["ip", "id", "style", "tryon"]
        with gr.Row():
            r1, t1 = app.upload("reference 1", "do-ref1"), gr.Radio(tasks, value="ip", label="task 1")
            r2, t2 = app.upload("reference 2", "do-ref2"), gr.Radio(tasks, value="tryon", label="task 2")
        d_prompt = gr.Textbox(label="prompt ([ref#1], [ref#2] name the references)", value="[ref#1] wearing [ref#2]")
        with gr.Row():
            d_model, d_dir = (
                gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1),
                gr.Textbox(label="DreamO folder", value=""),
            )
            d_version = gr.Radio(["v1.1", "v1", "none"], value="v1.1", label="recipe")
            d_size, d_steps, d_seed = app.sampling("1024x1024", 12)
        d_run, d_result = app.action("Customize")
        app.wire(d_run, customize, [r1, t1, r2, t2, d_prompt, d_model, d_dir, d_version, d_size, d_steps, d_seed],
             d_result)  # fmt: skip


def edit_tab(app: App) -> None:
    import gradio as gr

    def edit(kind: str, image: str, mask: str | None, prompt: str, model: str, steps: int, seed: int,
             progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.commands import checks
        from diffbase.commands.edit import load_editing
        from diffbase.editing import EditSettings, check_images, check_references, inpaint
        from diffbase.editing import edit as run_edit

        checks.count(steps, "steps")
        picture = checked_image(image, "image", app.limits)
        area = checked_mask(mask, "mask (inpaint)", app.limits, picture) if kind == "inpaint" else None
        pipe, spec = app.models.get(("edit", kind, model),
                                lambda: load_editing(model, kind, **app.rt.loader()))  # fmt: skip
        steps_progress.pipeline(pipe, kind, show=True)
        settings = EditSettings(prompt=prompt, seed=int(seed), steps=int(steps))
        if kind == "edit":
            check_references(spec, "edit", 1)
            check_images(pipe, [picture], ["image"])
            return run_edit(pipe, spec, [picture], settings)
        return inpaint(pipe, spec, picture, area, settings, [])

    with gr.Tab("Edit / Fill"):
        with gr.Row():
            kind = gr.Radio(["edit", "inpaint"], value="edit", label="Kontext edit or Fill inpaint")
            e_image, e_mask = app.upload("image", "ed-image"), app.upload("mask (inpaint)", "ed-mask")
        e_prompt = gr.Textbox(label="instruction / prompt", value="")
        with gr.Row():
            e_model = gr.Textbox(label="Kontext, FLUX.2 or Fill model folder", value="")
            _, e_steps, e_seed = app.sampling(None, 28)  # the size comes from the image
        e_run, e_result = app.action("Run")
        app.wire(e_run, edit, [kind, e_image, e_mask, e_prompt, e_model, e_steps, e_seed], e_result)


def upscale_tab(app: App) -> None:
    import gradio as gr

    def upscale(image: str, model: str, scale: float, strength: float, steps: int, seed: int,
                progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.commands import checks
        from diffbase.commands.upscale import vae_factor
        from diffbase.methods.upscale import UPSCALE
        from diffbase.upscale.sampling import UpscaleSettings, plan

        checks.number(scale, "scale", low=0, low_open=True)
        checks.number(strength, "strength", 0, 1, low_open=True)
        checks.count(steps, "steps")
        picture = checked_image(image, "image", app.limits)
        factor = vae_factor(model)
        tile = 128 * factor  # the model's native size, overlapped by an eighth as the command does
        settings = UpscaleSettings(scale=float(scale), strength=float(strength), steps=int(steps), seed=int(seed),
                                   max_pixels=app.limits.max_pixels, tile=tile, overlap=tile // 8)  # fmt: skip
        (w, h), tiles = plan(picture.size, settings, factor, tile, "scale")
        if tiles > app.limits.max_tiles:
            raise UserError(
                f"scale: a {w}x{h} result takes {tiles} tiles, more than this server's {app.limits.max_tiles}"
            )
        loaded = app.models.get(("upscale", model), lambda: UPSCALE.load(model, **app.rt.loader()))
        return UPSCALE.run(loaded, {"image": picture, "progress": True}, settings)

    with gr.Tab("Upscale"):
        u_image = app.upload("image", "up-image")
        with gr.Row():
            u_model = gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1)
            u_scale, u_strength = (
                gr.Number(label="scale", value=2.0),
                gr.Slider(0.05, 1.0, value=0.35, label="strength"),
            )
            _, u_steps, u_seed = app.sampling(None, 20)  # the size follows the scale
        u_run, u_result = app.action("Upscale")
        app.wire(u_run, upscale, [u_image, u_model, u_scale, u_strength, u_steps, u_seed], u_result)


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


TABS = (tryon_tab, dreamfit_tab, dreamo_tab, edit_tab, upscale_tab, monitor_tab)


def build_app(defaults: Defaults, limits: Limits) -> Any:
    import gradio as gr

    from diffbase.runtime import resolve

    rt = resolve(defaults.device, defaults.dtype, defaults.attention)  # once, for every tab
    rt.use_attention([])  # the process's SDPA kernels (a diffusers backend name needs the models: the CLI's)
    app = App(defaults, limits, Models(), rt, gr.Progress(track_tqdm=True))
    with gr.Blocks(title="diffbase") as blocks:
        gr.Markdown("# diffbase\nLocal models only; the defaults are the shipped toy models (tiny, CPU-friendly).")
        for tab in TABS:
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
                        attention=args.attention)  # fmt: skip
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_seconds, args.max_tiles)
    serve(args.host, args.port, defaults, limits)


def add_parsers(sub: Any) -> None:
    """`diffbase serve` and its flags."""
    from diffbase.runtime import add_arguments

    web = sub.add_parser("serve", help="the web UI (Gradio): try-on, DreamFit, DreamO, edit, upscale, training monitor")
    web.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it to your network)")
    web.add_argument("--port", type=int, default=7860)
    add_arguments(web, offload=False)
    web.add_argument("--tryon-weights", help="the try-on tab's default weights (e.g. outputs/demo/run/vton)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="uploads larger than this are refused")
    web.add_argument("--max-pixels", type=int, default=4096 * 4096, help="images with more pixels are refused")
    web.add_argument("--max-seconds", type=float, default=600.0, help="one request's time limit (it stops at a step)")
    web.add_argument("--max-tiles", type=int, default=64, help="the upscale tab's limit on tiles per request")
    web.set_defaults(func=run_serve)
