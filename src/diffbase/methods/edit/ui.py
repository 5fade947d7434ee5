"""The web UI's edit tab: the fields of `diffbase edit`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.interface.web import App, checked_image, checked_mask


def tab(app: App) -> None:
    import gradio as gr

    def edit(kind: str, image: str, mask: str | None, prompt: str, model: str, steps: int, seed: int,
             progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.interface import checks
        from diffbase.methods.edit.mechanism import EditSettings, check_images, check_references, inpaint
        from diffbase.methods.edit.mechanism import edit as run_edit
        from diffbase.methods.edit.method import load_editing

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
