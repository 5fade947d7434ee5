"""The web UI's dreamo tab: the fields of `diffbase dreamo`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import App, checked_image, checked_size, example


def tab(app: App) -> None:
    import gradio as gr

    def customize(ref1: str | None, task1: str, ref2: str | None, task2: str, prompt: str, model: str, dreamo: str,
                  version: str, size: str, steps: int, seed: int, ref_res: int,
                  progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.interface import checks
        from diffbase.methods.dreamo.mechanism.files import recipe
        from diffbase.methods.dreamo.mechanism.generate import DreamOSettings
        from diffbase.methods.dreamo.method import DREAMO, check_prompt

        checks.model_folder(model, family="flux1", job="DreamO")
        if not dreamo:
            raise UserError(
                "DreamO folder: give a DreamO folder (dreamo.safetensors; the official one or one trained here)"
            )
        h, w = checked_size(size, 16, app.limits)
        checks.count(steps, "steps")
        checks.count(ref_res, "reference resolution")
        if int(ref_res) ** 2 > app.limits.max_pixels:
            raise UserError(f"reference resolution: {int(ref_res)} is beyond this server's pixel limit")
        slots = [(checked_image(r, f"reference {k}", app.limits), t, None, None) if r else None
                 for k, (r, t) in enumerate(((ref1, task1), (ref2, task2)), start=1)]  # fmt: skip
        if not any(slots):
            raise UserError("references: upload at least one")
        check_prompt(prompt, slots, "prompt")
        loaded = app.load(("dreamo", model, dreamo, version),
                          lambda: DREAMO.load(model, dreamo, version, **app.rt.loader()), lambda v: [v[0].transformer])  # fmt: skip
        settings = DreamOSettings(prompt=prompt, height=h, width=w, steps=int(steps), seed=int(seed),
                                  guidance=recipe(version).guidance)  # fmt: skip
        return DREAMO.run(loaded, {"references": slots, "resolution": int(ref_res)}, settings)

    with gr.Tab("DreamO", id="dreamo"):
        tasks = ["ip", "id", "style", "tryon"]
        with gr.Row():
            r1 = app.upload("reference 1", "do-ref1", example("dreamo/references/00000_1.png"))
            r2 = app.upload("reference 2", "do-ref2", example("dreamo/references/00000_2.png"))
        with gr.Row():
            t1, t2 = gr.Radio(tasks, value="ip", label="task 1"), gr.Radio(tasks, value="ip", label="task 2")
        d_prompt = gr.Textbox(label="prompt ([ref#1], [ref#2] name the references)",
                              value="[ref#2] on the left and [ref#1] on the right")  # fmt: skip
        with gr.Row():
            d_model, d_dir = (
                gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1),
                gr.Textbox(label="DreamO folder", value=app.defaults.dreamo),
            )
            d_version = gr.Radio(["v1.1", "v1", "none"], value="none", label="recipe (none: a folder trained here)")
            d_size, d_steps, d_seed = app.sampling("32x64", 12)  # the toy's size (1024x1024 for FLUX.1 dev)
            d_res = gr.Number(label="reference resolution (the toy's 32; 512 for FLUX.1 dev)", value=32, precision=0)
        d_run, d_result = app.action("Customize", "dreamo")
        app.wire(d_run, customize, [r1, t1, r2, t2, d_prompt, d_model, d_dir, d_version, d_size, d_steps, d_seed, d_res],
                 d_result, "DreamO")  # fmt: skip
