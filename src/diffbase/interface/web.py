"""What every web UI tab shares: the defaults and limits, the loaded model and its lock, the checks of uploads
and fields (the commands' checks, named by the field's label), the path fields kept under `--models-root`,
the image inputs (previews; a canvas to paint a mask on), the request's Stop and time limit, each tab's own
status line for its errors, and the session's results gallery. A method's tab (its package's ui.py) builds on
`App`; diffbase.serve lays the tabs out and serves them."""

from __future__ import annotations

import functools
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from diffbase.errors import UserError, first_line

ZOO = Path(__file__).resolve().parents[1] / "zoo_weights"
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # a clone's shipped examples (absent from a wheel)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def example(relative: str) -> str | None:
    """A shipped example input (the tabs' first values), or None where this install has no examples/ folder."""
    path = EXAMPLES / relative
    return str(path) if path.is_file() else None


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_seconds: float = 600.0  # one request's run time; past it the work stops at its next step
    max_tiles: int = 64  # the upscale tab's limit


@dataclass(frozen=True)
class Defaults:
    """What the tabs start with: the toy zoo (and the toy DreamFit / DreamO weights trained on it), the demo's
    trained try-on weights when given, the server's output folder and the models folder path fields must be in."""

    sd15: str = str(ZOO / "sd15-toy")
    flux1: str = str(ZOO / "flux1-toy")
    dreamfit: str = str(ZOO / "dreamfit-toy" / "dreamfit.bin")
    dreamo: str = str(ZOO / "dreamo-toy")
    tryon_weights: str = ""
    device: str = "auto"
    dtype: str = "float32"
    attention: str = "auto"
    quantize: str = "none"  # every tab's denoiser
    offload: str = "none"  # every tab's pipeline (none, model, blocks, sequential)
    offload_blocks: int = 1
    compile: bool | str = False  # every tab's denoiser: its repeated blocks compiled (the first request pays)
    out: str = "outputs/serve"  # the gallery, the training runs started from the page, the toy edit models
    models_root: str = ""  # set: every path field must name something under it (or the shipped zoo, or `out`)

    @property
    def kontext(self) -> str:
        return str(Path(self.out) / "zoo" / "flux1-kontext-toy")

    @property
    def fill(self) -> str:
        return str(Path(self.out) / "zoo" / "flux1-fill-toy")


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
# The wired tabs' fields (App.wire) that name a file or folder on the server: with --models-root, App.handler
# keeps each under it. (The Train and monitor tabs are not wired: they call App.check_path on their own fields.)
PATH_FIELDS = {"SD1.5 model folder", "FLUX.1 model folder", "Kontext, FLUX.2 or Fill model folder",
               "trained attention weights (a run's vton/ folder)", "DreamFit checkpoint", "DreamO folder"}  # fmt: skip


def checked_size(text: str, multiple: int, limits: Limits) -> tuple[int, int]:
    """The HxW field: the family's multiple, and no more pixels than this server's limit."""
    from diffbase.interface import checks

    h, w = checks.size(text, "HxW", multiple)
    if h * w > limits.max_pixels:
        raise UserError(f"HxW: {h}x{w} is beyond this server's limit of {limits.max_pixels} pixels")
    return h, w


def _upload_path(value: Any, what: str) -> str | None:
    """The server's copy of an upload: a path, or an image input's error (the canvas could not read it)."""
    if isinstance(value, dict):
        if value.get("error"):
            raise UserError(f"{what}: {value['error']}")
        value = value.get("background")
    return value or None


def checked_image(path: Any, what: str, limits: Limits) -> Image.Image:
    """An upload (the server's temporary copy) as RGB, refused before decoding when it is too many bytes or
    pixels; the same checks as the commands', named by the field's label. A canvas value gives its picture."""
    from diffbase.interface import checks

    path = _upload_path(path, what)
    if not path:
        raise UserError(f"{what}: upload an image")
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"{what}: {size / 2**20:.1f} MB is more than the {limits.max_bytes / 2**20:.0f} MB limit")
    return checks.image(path, what, max_pixels=limits.max_pixels, show_path=False)


def checked_mask(path: str | None, what: str, limits: Limits, image: Image.Image) -> Image.Image:
    from diffbase.interface import checks

    if not path:
        raise UserError(f"{what}: upload a mask")
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"{what}: {size / 2**20:.1f} MB is more than the {limits.max_bytes / 2**20:.0f} MB limit")
    return checks.mask(path, what, image.size, show_path=False)


def painted_mask(value: Any, what: str, limits: Limits, image: Image.Image) -> Image.Image | None:
    """The area painted on a canvas (every layer's opaque pixels), white on black at the picture's size, or
    None where nothing is painted."""
    if not isinstance(value, dict):
        return None
    area: Image.Image | None = None
    for layer in value.get("layers") or []:
        if not layer:
            continue
        path = Path(layer)
        if path.stat().st_size > limits.max_bytes:
            raise UserError(f"{what}: the painted layer is more than the {limits.max_bytes / 2**20:.0f} MB limit")
        from diffbase.data.images import image_size

        w, h = image_size(path)
        if w * h > limits.max_pixels:
            raise UserError(f"{what}: the painted layer is {w}x{h}, beyond the limit of {limits.max_pixels} pixels")
        with Image.open(path) as opened:
            rgba = opened.convert("RGBA")
        alpha = rgba.getchannel("A").point(lambda v: 255 if v > 0 else 0)
        if alpha.size != image.size:
            alpha = alpha.resize(image.size, Image.NEAREST)
        area = alpha if area is None else Image.fromarray(_max(area, alpha))
    if area is None or area.getextrema()[1] == 0:
        return None
    return area


def chosen_mask(canvas: Any, mask: str | None, limits: Limits, image: Image.Image, painted_what: str,
                mask_what: str, missing: str) -> Image.Image:  # fmt: skip
    """The area a tab works on, given as a mask file or painted on the picture's canvas (one rule for every tab
    that takes either). Precedence: the painted strokes are checked first (their errors name the canvas field);
    both given is refused, naming the mask file field (it sits in a closed accordion, so silently preferring
    either would surprise whoever forgot it there); neither given is refused naming the canvas field, with
    `missing` saying what to paint."""
    painted = painted_mask(canvas, painted_what, limits, image)
    if mask and painted is not None:
        raise UserError(f"{mask_what}: give a mask file or paint the area on the picture, not both (clear one)")
    if mask:
        return checked_mask(mask, mask_what, limits, image)
    if painted is None:
        raise UserError(f"{painted_what}: {missing} (or give a mask file)")
    return painted


def _max(a: Image.Image, b: Image.Image) -> Any:
    import numpy as np

    return np.maximum(np.asarray(a), np.asarray(b))


def mask_box(mask: Image.Image) -> tuple[int, int, int, int]:
    """The rectangle around a painted area."""
    x0, y0, x1, y1 = mask.getbbox()  # type: ignore[misc]  (an empty mask never gets here)
    return x0, y0, x1, y1


class Request:
    """The running request's stop conditions: the Stop button and the per-request time limit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.cancel = threading.Event()
        self.deadline = 0.0
        self.owner: str | None = None  # the session whose request runs: only its Stop stops it

    def reason(self) -> str | None:
        import time

        if self.cancel.is_set():
            return "stopped (the Stop button)"
        if time.monotonic() > self.deadline:
            return f"stopped: the request ran past the {self.limits.max_seconds:g} s limit"
        return None

    def stop(self, session: str | None = None) -> None:
        if session is None or self.owner in (None, session):
            self.cancel.set()


def relabel(message: str, labels: dict[str, str]) -> str:
    """An error from the commands' shared code, its leading flag (`--weights: ...`) named as the tab's field."""
    for flag, label in labels.items():
        if message.startswith((f"{flag}:", f"{flag} ")):
            return label + message[len(flag) :]
    return message


def user_message(err: BaseException, labels: dict[str, str] | None = None, what: str = "the run") -> str:
    """One line for the page: a UserError's own words (the CLI's, with the tab's field names); anything else
    named by its type only (its text is library detail; the server's log has the traceback)."""
    if isinstance(err, UserError):
        return relabel(first_line(err, 500), labels or {})
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return f"{what}: out of memory; try a smaller HxW, fewer steps, --offload or --quantize"
    print(f"diffbase serve: {what} failed:", file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)
    return f"{what} failed unexpectedly ({type(err).__name__}); the server's log has the details"


def guarded(
    fn: Callable[..., Any], models: Models, request: Request, labels: dict[str, str] | None = None
) -> Callable[..., Any]:
    """Runs `fn` under the model lock and the request's stop conditions (checked at every sampling step); a
    UserError (or any failure) becomes a one-line gr.Error named by the field's label (the API's form; the
    page shows the same line in the tab's status, App.wire)."""
    import gradio as gr

    @functools.wraps(fn)  # gradio reads the signature (its progress argument) through the wrapper
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return locked(fn, models, request)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  (the server keeps serving; the page says what failed)
            raise gr.Error(user_message(err, labels)) from None

    return run


def locked(fn: Callable[..., Any], models: Models, request: Request, session: str | None = None) -> Callable[..., Any]:
    """`fn` under the model lock, with the request's clock started and its Stop cleared."""
    import time

    from diffbase import progress

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with models.lock:
            request.cancel.clear()
            request.owner = session
            request.deadline = time.monotonic() + request.limits.max_seconds
            try:
                with progress.stop_when(request.reason):
                    return fn(*args, **kwargs)
            finally:
                request.owner = None

    return run


def default_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A torso-sized box in the middle of the person, when neither a mask nor a box is given."""
    w, h = size
    x0, y0, x1, y1 = round(0.2 * w), round(0.22 * h), round(0.8 * w), round(0.62 * h)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def parse_box(text: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    from diffbase.interface import checks

    return checks.box(text, "garment box", size) if text.strip() else default_box(size)


def under(path: Path, roots: list[Path]) -> bool:
    resolved = path.expanduser().absolute().resolve()
    return any(resolved == r or resolved.is_relative_to(r) for r in roots)


@dataclass
class TabInfo:
    """A tab's run: its title, its fields by name (what the gallery stores and restores) and the handler."""

    title: str
    names: list[str]
    components: list[Any]
    handler: Callable[..., Any]


@dataclass
class App:
    """What every tab shares: the defaults and limits, the loaded model and its lock, the runtime (resolved
    once) and the helpers that lay out a tab's uploads, fields and buttons."""

    defaults: Defaults
    limits: Limits
    models: Models
    rt: Any
    tracked: Any  # gradio fills in a progress bar where a function takes one
    gallery: Any = None  # interface.gallery.Gallery: each result with its settings, kept per session and on disk
    tabs: dict[str, TabInfo] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)  # the gallery's state and view a run updates (serve sets them)
    jobs: Any = None  # interface.jobs.Jobs: the Train tab's queue
    train_use: Any = None  # the Train tab's "use its export" button, wired once every tab exists

    def load(self, key: tuple, load: Callable[[], Any], denoisers: Callable[[Any], list[Any]],
             backend: bool = True) -> Any:  # fmt: skip
        """The model for a request (the last one loaded, when `key` is the same). A fresh one gets what the
        commands give theirs once loaded: the attention choice on its denoisers and, with --compile, their repeated
        blocks compiled (`backend` False: the method's own attention processors stay; runtime.Runtime.use)."""

        def ready() -> Any:
            value = load()
            self.rt.use(denoisers(value), backend)
            return value

        return self.models.get(key, ready)

    # -- the fields

    def roots(self) -> list[Path]:
        if not self.defaults.models_root:
            return []
        return [Path(p).expanduser().absolute().resolve() for p in (self.defaults.models_root, ZOO, self.defaults.out)]

    def check_path(self, text: Any, label: str) -> None:
        """A path field: with --models-root, only something under it (the shipped zoo and this server's own
        output folder too). The refusal is the same whether or not the path exists."""
        roots = self.roots()
        if roots and isinstance(text, str) and text.strip() and not under(Path(text.strip()), roots):
            raise UserError(f"{label}: not under this server's models folder ({self.defaults.models_root})")

    def upload(self, label: str, elem_id: str, value: str | None = None) -> Any:
        """An image input that shows the picture (the server reads it only after the header checks)."""
        import gradio as gr

        return as_picture(gr.Image(label=label, type="filepath", elem_id=elem_id, value=value, height=220,
                                sources=["upload", "clipboard"], format="png"))  # fmt: skip

    def canvas(self, label: str, elem_id: str, value: str | None = None) -> Any:
        """An image input to paint on: the picture is the background, the painted strokes the mask."""
        import gradio as gr

        start = {"background": value, "layers": [], "composite": value} if value else None
        brush = gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed")  # a mask colour
        return as_canvas(gr.ImageEditor(label=label, type="filepath", elem_id=elem_id, value=start, height=320,
                                        sources=["upload", "clipboard"], image_mode="RGBA", format="png",
                                        layers=False, transforms=(), brush=brush, eraser=gr.Eraser()))  # fmt: skip

    def sampling(self, size: str | None, steps: int) -> tuple[Any, Any, Any]:
        """The HxW (None: the tab takes the size from its input), steps and seed fields of a generating tab."""
        import gradio as gr

        hw = gr.Textbox(label="HxW", value=size) if size is not None else None
        return hw, gr.Number(label="steps", value=steps, precision=0), gr.Number(label="seed", value=0, precision=0)

    def action(self, label: str, prefix: str | None = None) -> tuple[Any, Any]:
        """The run and stop buttons, the tab's status line (its errors) and the result image."""
        import gradio as gr

        with gr.Row():
            run = gr.Button(label, variant="primary", elem_id=f"{prefix}-run" if prefix else None)
            stop = gr.Button(
                "Stop", variant="stop", scale=0, min_width=160, elem_id=f"{prefix}-stop" if prefix else None
            )
        status = gr.Markdown("", elem_id=f"{prefix}-status" if prefix else None)
        result = gr.Image(label="result", type="pil", format="png", elem_id=f"{prefix}-result" if prefix else None)
        return (run, stop, status), result

    # -- running

    def handler(self, name: str, title: str, fn: Callable[..., Any], inputs: list[Any],
                names: list[str], request: Request) -> Callable[..., Any]:  # fmt: skip
        """`fn` with the path fields checked, under the lock and stop conditions, its result put in the session's
        gallery: (image or None, the status line, the gallery entry or None)."""
        import gradio as gr

        field_labels = [getattr(c, "label", None) for c in inputs]
        labels = {FLAGS[x]: x for x in field_labels if x in FLAGS}
        images = {n for n, c in zip(names, inputs, strict=True) if isinstance(c, gr.Image | gr.ImageEditor)}

        def run(*values: Any, session: str | None = None, progress: Any = None) -> tuple[Any, str, Any]:
            try:
                for label, value in zip(field_labels, values, strict=True):
                    if label in PATH_FIELDS:
                        self.check_path(value, label)
                extra = {"progress": progress} if progress is not None else {}
                image = locked(fn, self.models, request, session)(*values, **extra)
            except Exception as err:  # noqa: BLE001  (the server keeps serving; the tab says what failed)
                return None, "**error:** " + user_message(err, labels, title), None
            entry = None
            if self.gallery is not None:
                settings = dict(zip(names, values, strict=True))
                entry = self.gallery.add(session or "local", name, title, image, settings, images)
            return image, "", entry

        return run

    def wire(self, buttons: tuple[Any, ...], fn: Callable[..., Any], inputs: list[Any], output: Any,
             title: str | None = None, names: list[str] | None = None) -> None:  # fmt: skip
        """Run `fn` on the button (one request at a time, stopped at the time limit); Stop ends it at its next step.
        Errors show as one line in the tab's own status, fields named by their labels; results join the session's
        gallery (self.outputs: its state and view). `names`: the settings' names (default: `fn`'s parameters, one
        per input)."""
        import inspect

        import gradio as gr

        run, stop, status = buttons
        name = (run.elem_id or f"tab{len(self.tabs)}").removesuffix("-run")
        names = names or list(inspect.signature(fn).parameters)[: len(inputs)]
        request = Request(self.limits)  # this tab's: its Stop stops its own work, not another tab's
        handler = self.handler(name, title or name, fn, inputs, names, request)
        self.tabs[name] = TabInfo(title or name, names, inputs, handler)
        n, kept = len(inputs), bool(self.outputs)

        def event(*args: Any) -> Any:
            fields, rest = args[:n], args[n:]
            state = rest[0] if kept else None
            progress, req = rest[-2], rest[-1]
            image, message, entry = handler(*fields, session=getattr(req, "session_hash", None), progress=progress)
            shown = image  # None on an error: the result clears, the status says why (the gallery keeps results)
            if not kept:
                return shown, message
            state = [*(state or []), *([entry] if entry is not None else [])]
            return shown, message, state, self.gallery.shown(state)

        special(event, names + ["state"] * int(kept), self.tracked, name)
        click = run.click(event, [*inputs, *self.outputs[:1]], [output, status, *self.outputs],
                          concurrency_id="model", concurrency_limit=1, api_name=fn.__name__)  # one queue for every tab  # fmt: skip

        def stop_mine(req: gr.Request) -> None:
            request.stop(getattr(req, "session_hash", None))

        stop_mine.__annotations__ = {"req": gr.Request}
        stop.click(stop_mine, None, None, queue=False, cancels=[click], api_name=f"{name}_stop")


def special(fn: Callable[..., Any], names: list[str], tracked: Any, name: str) -> None:
    """Gives `fn(*args)` the signature gradio reads (the API's parameter names): the inputs, then its progress bar
    and the request."""
    import inspect

    import gradio as gr

    P = inspect.Parameter
    params = [P(x if x.isidentifier() else f"input_{i}", P.POSITIONAL_OR_KEYWORD) for i, x in enumerate(names)]
    params += [P("progress", P.POSITIONAL_OR_KEYWORD, default=tracked),
               P("req", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)]  # fmt: skip
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {"req": gr.Request}
    fn.__name__ = name.replace("-", "_")


def as_picture(component: Any) -> Any:
    """A gr.Image that passes the server's copy of an upload on without decoding it (the tab's checks read the
    header first: bytes, pixels, a readable image), so a bad upload is a one-line error in its tab. (The
    instance's preprocess is replaced: a subclass would make gradio write a .pyi stub beside this module.)"""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and getattr(payload, "path", None):
            return str(payload.path)
        return original(payload)

    component.preprocess = preprocess
    return component


def as_canvas(component: Any) -> Any:
    """A gr.ImageEditor whose unreadable inputs (too many pixels, not an image) reach the tab as an error value
    instead of failing inside gradio (shown there as library text, in a toast on whichever tab is open)."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except Image.DecompressionBombError:
            return {"error": "the image has more pixels than this server's limit", "layers": []}
        except Exception:  # noqa: BLE001  (PIL raises several types for a file that is not an image)
            return {"error": "not a readable image", "layers": []}

    component.preprocess = preprocess
    return component


def toy_editors(out: Path) -> tuple[Path, Path]:
    """Kontext and Fill models made from the shipped toy FLUX.1, once, under the server's output folder, so the
    edit tab runs on its first click: Kontext is the toy's own components under FluxKontextPipeline (FLUX.1
    Kontext has FLUX.1's layout); Fill widens the toy transformer's input layer with zero weights for the masked
    picture and the mask (it starts as the toy text-to-image model, repainting the masked area)."""
    import json
    import os
    import shutil
    import tempfile

    from diffbase.io import default_mode

    toy = ZOO / "flux1-toy"
    shared = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]
    index = json.loads((toy / "model_index.json").read_text())
    kontext, fill = out / "flux1-kontext-toy", out / "flux1-fill-toy"
    for folder, pipeline in ((kontext, "FluxKontextPipeline"), (fill, "FluxFillPipeline")):
        if (folder / "model_index.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))  # renamed into place when whole
        try:
            for name in shared + (["transformer"] if pipeline == "FluxKontextPipeline" else []):
                os.symlink(toy / name, tmp / name, target_is_directory=True)
            if pipeline == "FluxFillPipeline":
                widened_transformer(toy, tmp / "transformer")
            extra = {} if pipeline == "FluxKontextPipeline" else {"image_encoder": None, "feature_extractor": None}
            rows = {k: v for k, v in index.items() if k not in extra}
            (tmp / "model_index.json").write_text(json.dumps(rows | {"_class_name": pipeline}, indent=2))
            default_mode(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return kontext, fill


def widened_transformer(toy: Path, out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(toy / "transformer")
    scale = 2 ** (len(AutoencoderKL.load_config(toy / "vae")["block_out_channels"]) - 1)
    old = model.x_embedder
    width = old.in_features * 2 + 4 * scale * scale  # noisy latents, masked-picture latents, the mask packed
    new = torch.nn.Linear(width, old.out_features)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        new.bias.copy_(old.bias)
    model.x_embedder = new
    model.register_to_config(in_channels=width, out_channels=old.in_features)
    model.save_pretrained(out, safe_serialization=True)
