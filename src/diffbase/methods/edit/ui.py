"""The web UI's edit tab: the fields of `diffbase edit` / `diffbase inpaint`, checked as the commands check them, run
through the same load / run. The Fill mask is painted on the image (or given as a mask file)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.interface.web import App, checked_image, chosen_mask, example

MODEL = "Kontext, FLUX.2 or Fill model folder"


def tab(app: App) -> None:
    import gradio as gr

    def edit(kind: str, image: Any, mask: str | None, prompt: str, model: str, steps: int, seed: int,
             progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.interface import checks
        from diffbase.methods.edit.mechanism import (
            EditSettings,
            check_images,
            check_pipeline,
            check_references,
            inpaint,
        )
        from diffbase.methods.edit.mechanism import edit as run_edit
        from diffbase.methods.edit.method import load_editing

        checks.count(steps, "steps")
        spec = checks.model_folder(model, name="--model")
        if spec is not None:
            check_pipeline(spec, kind, model)
        what = "image (paint the area to fill)"
        picture = checked_image(image, what, app.limits)
        area = None
        if kind == "inpaint":
            area = chosen_mask(image, mask, app.limits, picture, what, "mask file (inpaint)",
                                "paint the area to fill on the image")  # fmt: skip
        pipe, spec = app.load(("edit", kind, model), lambda: load_editing(model, kind, **app.rt.loader()),
                              lambda v: [getattr(v[0], v[1].denoiser)])  # fmt: skip
        steps_progress.pipeline(pipe, kind, show=True)
        w, h = (max(16, side // 16 * 16) for side in picture.size)  # the picture's size, as the family needs it
        settings = EditSettings(prompt=prompt, seed=int(seed), steps=int(steps), height=h, width=w, keep_size=True)
        if kind == "edit":
            check_references(spec, "edit", 1)
            check_images(pipe, [picture], ["image"])
            return run_edit(pipe, spec, [picture], settings)
        return inpaint(pipe, spec, picture, area, settings, [])

    with gr.Tab("Edit / Fill", id="edit"):
        with gr.Row():
            kind = gr.Radio(["edit", "inpaint"], value="edit", label="Kontext edit or Fill inpaint")
            e_image = app.canvas("image (paint the area to fill)", "ed-image", example("edits/source/00000.png"))
        with gr.Accordion("mask file (inpaint, optional)", open=False):
            e_mask = app.upload("mask file (inpaint)", "ed-mask")
        e_prompt = gr.Textbox(label="instruction / prompt", value="make the shirt teal")
        with gr.Row():
            e_model = gr.Textbox(label=MODEL, value=app.defaults.kontext)
            _, e_steps, e_seed = app.sampling(None, 8)  # the size comes from the image
        e_run, e_result = app.action("Run", "edit")

        def model_for(kind: str, model: str) -> str:
            """Switching between edit and inpaint swaps the toy models (a folder of one's own stays)."""
            toys = {"edit": app.defaults.kontext, "inpaint": app.defaults.fill}
            return toys[kind] if model in toys.values() or not model else model

        kind.change(model_for, [kind, e_model], e_model, queue=False)
        app.wire(e_run, edit, [kind, e_image, e_mask, e_prompt, e_model, e_steps, e_seed], e_result, "Edit / Fill")
