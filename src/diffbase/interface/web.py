"""What every web UI tab shares: the defaults and limits, the loaded model and its lock, the checks of uploads
and fields (the commands' checks, named by the field's label), and the request's Stop and time limit.
A method's tab (its package's ui.py) builds on `App`; diffbase.serve lays the tabs out and serves them."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffbase.errors import UserError

ZOO = Path(__file__).resolve().parents[1] / "zoo_weights"


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
    quantize: str = "none"  # every tab's denoiser
    offload: str = "none"  # every tab's pipeline (none, model, blocks, sequential)
    offload_blocks: int = 1


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
    from diffbase.interface import checks

    h, w = checks.size(text, "HxW", multiple)
    if h * w > limits.max_pixels:
        raise UserError(f"HxW: {h}x{w} is beyond this server's limit of {limits.max_pixels} pixels")
    return h, w


def checked_image(path: str | None, what: str, limits: Limits) -> Image.Image:
    """An upload (the server's temporary copy) as RGB, refused before decoding when it is too many bytes or
    pixels; the same checks as the commands', named by the field's label."""
    from diffbase.interface import checks

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
    from diffbase.interface import checks

    return checks.box(text, "garment box", size) if text.strip() else default_box(size)


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
