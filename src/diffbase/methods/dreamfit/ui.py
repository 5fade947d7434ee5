"""The web UI's dreamfit tab: the fields of `diffbase dreamfit`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import App, checked_image, checked_mask, checked_size


def tab(app: App) -> None:
    import gradio as gr

    def dreamfit(mode: str, garment: str, person: str | None, mask: str | None, pose: str | None, prompt: str,
                 model: str, checkpoint: str, size: str, steps: int, seed: int,
                 progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.interface import checks
        from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings
        from diffbase.methods.dreamfit.method import DREAMFIT

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
