"""The web UI's tryon tab: the fields of `diffbase tryon`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.interface.web import App, checked_image, checked_mask, checked_size, parse_box


def tab(app: App) -> None:
    import gradio as gr

    def tryon(person: str, garment: str, mask: str | None, box: str, method: str, model: str, weights: str,
              size: str, steps: int, seed: int, progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.interface import checks
        from diffbase.methods.tryon.mechanism.data import box_mask
        from diffbase.methods.tryon.mechanism.sampling import TryOnSettings
        from diffbase.methods.tryon.method import VTON

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
