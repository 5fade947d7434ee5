"""The web UI's tryon tab: the fields of `diffbase tryon`, checked as the command checks them, run through the same
load / run. The garment area is painted on the person (as the mask, or the rectangle around the strokes), or
given as a mask file or a box; with none, a box in the middle of the person."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import (
    App,
    checked_image,
    checked_mask,
    checked_size,
    example,
    mask_box,
    painted_mask,
    parse_box,
)

AREAS = ["the painted area is the mask", "the rectangle around the painted area"]


def area_mask(person: Any, person_img: Image.Image, mask: str | None, area: str, box: str, app: App) -> Image.Image:
    """The garment area: a mask file, else what is painted on the person, else the box (or the middle)."""
    from diffbase.methods.tryon.mechanism.data import box_mask

    painted = painted_mask(person, "person (paint the garment area)", app.limits, person_img)
    if mask:
        if painted is not None:
            raise UserError("mask file (optional): give a mask file or paint on the person, not both")
        return checked_mask(mask, "mask file (optional)", app.limits, person_img)
    if painted is not None:
        return painted if area == AREAS[0] else box_mask(person_img.size, mask_box(painted))
    return box_mask(person_img.size, parse_box(box, person_img.size))


def tab(app: App) -> None:
    import gradio as gr

    def tryon(person: Any, garment: str, mask: str | None, area: str, box: str, method: str, model: str, weights: str,
              size: str, steps: int, seed: int, progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.interface import checks
        from diffbase.methods.tryon.mechanism.sampling import TryOnSettings
        from diffbase.methods.tryon.method import VTON

        h, w = checked_size(size, 8, app.limits)
        checks.count(steps, "steps")
        checks.model_folder(model, family="sd15", job="try-on", name="--model")
        checks.weights_file(weights or None, "--weights")
        person_img = checked_image(person, "person (paint the garment area)", app.limits)
        garment_img = checked_image(garment, "garment", app.limits)
        mask_img = area_mask(person, person_img, mask, area, box, app)
        progress(0, desc="loading the model")
        bb = app.load(("tryon", model, weights, method), lambda: VTON.load(model, weights or None, method, **app.rt.loader()),
                      lambda v: [v.denoiser], backend=False)  # try-on's own attention processors stay  # fmt: skip
        progress(0.1, desc="sampling")
        settings = TryOnSettings(steps=int(steps), seed=int(seed))
        return VTON.run(bb, {"person": person_img, "garment": garment_img, "mask": mask_img}, settings, (h, w))

    with gr.Tab("Try-on", id="tryon"):
        with gr.Row():
            person = app.canvas("person (paint the garment area)", "tryon-person", example("tryon/person_0.png"))
            garment = app.upload("garment", "tryon-garment", example("tryon/garment_0.png"))
        with gr.Row():
            area = gr.Radio(AREAS, value=AREAS[0], label="painted strokes")
            box = gr.Textbox(label="garment box x0,y0,x1,y1 (nothing painted; empty: the middle of the person)",
                             value="")  # fmt: skip
        with gr.Accordion("mask file (optional)", open=False):
            mask = app.upload("mask file (optional)", "tryon-mask")
        with gr.Row():
            method = gr.Radio(["catvton", "vton"], value="catvton", label="method")
            model = gr.Textbox(label="SD1.5 model folder", value=app.defaults.sd15)
            weights = gr.Textbox(
                label="trained attention weights (a run's vton/ folder)", value=app.defaults.tryon_weights
            )
        with gr.Row():
            size, steps, seed = app.sampling("64x48", 20)
        run, result = app.action("Try on", "tryon")
        app.wire(run, tryon, [person, garment, mask, area, box, method, model, weights, size, steps, seed], result,
                 "Try-on")  # fmt: skip
