"""The web UI's dreamfit tab: the fields of `diffbase dreamfit`, checked as the command checks them, run through the same
load / run. In try-on mode the garment area is painted on the person (or given as a mask file)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import App, checked_image, checked_size, chosen_mask, example


def tab(app: App) -> None:
    import gradio as gr

    def dreamfit(mode: str, garment: str, person: Any, mask: str | None, pose: str | None, prompt: str,
                 model: str, checkpoint: str, size: str, steps: int, seed: int,
                 progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase import progress as steps_progress
        from diffbase.interface import checks
        from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings
        from diffbase.methods.dreamfit.method import DREAMFIT

        if not checkpoint:
            raise UserError("DreamFit checkpoint: give a DreamFit checkpoint file (official .bin or one trained here)")
        checks.model_folder(model, family="flux1", job="DreamFit")
        checks.weights_file(checkpoint, "DreamFit checkpoint")
        h, w = checked_size(size, 16, app.limits)
        checks.count(steps, "steps")
        inputs: dict[str, Any] = {"garment": checked_image(garment, "garment", app.limits)}
        if pose and mode != "garment":
            inputs["pose"] = checked_image(pose, "pose image", app.limits)
        if mode == "pose" and not pose:
            raise UserError("pose image: pose mode needs a pose image (OpenPose colours)")
        if mode == "tryon":
            what = "person (try-on: paint the garment area)"
            inputs["person"] = checked_image(person, what, app.limits)
            inputs["mask"] = chosen_mask(person, mask, app.limits, inputs["person"], what, "mask file (try-on)",
                                         "paint the garment area on the person")  # fmt: skip
        progress(0, desc="loading the model")
        loaded = app.load(("dreamfit", model, checkpoint), lambda: DREAMFIT.load(model, checkpoint, **app.rt.loader()),
                          lambda v: [v[0].transformer], backend=False)  # its own processors call PyTorch's SDPA  # fmt: skip
        steps_progress.pipeline(loaded[0], "dreamfit", show=True)
        settings = DreamFitSettings(prompt=prompt, mode=mode, steps=int(steps), seed=int(seed), height=h, width=w)
        return DREAMFIT.run(loaded, inputs, settings)

    with gr.Tab("DreamFit", id="dreamfit"):
        mode = gr.Radio(["garment", "pose", "tryon"], value="garment", label="mode")
        with gr.Row():
            f_garment = app.upload("garment", "df-garment", example("tryon/garment_0.png"))
            f_pose = app.upload("pose image (pose, optional for try-on)", "df-pose", example("tryon/pose_0.png"))
            f_person = app.canvas("person (try-on: paint the garment area)", "df-person", example("tryon/person_0.png"))
        with gr.Accordion("mask file (try-on, optional)", open=False):
            f_mask = app.upload("mask file (try-on)", "df-mask")
        f_prompt = gr.Textbox(label="prompt", value="a person")
        with gr.Row():
            f_model, f_ckpt = (
                gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1),
                gr.Textbox(label="DreamFit checkpoint", value=app.defaults.dreamfit),
            )
            f_size, f_steps, f_seed = app.sampling("32x32", 20)
        f_run, f_result = app.action("Generate", "dreamfit")
        app.wire(f_run, dreamfit,
                 [mode, f_garment, f_person, f_mask, f_pose, f_prompt, f_model, f_ckpt, f_size, f_steps, f_seed],
                 f_result, "DreamFit")  # fmt: skip
