"""The web UI's dreamo tab: the fields of `diffbase dreamo`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import App, checked_image, checked_size


def tab(app: App) -> None:
    import gradio as gr

    def customize(ref1: str | None, task1: str, ref2: str | None, task2: str, prompt: str, model: str, dreamo: str,
                  version: str, size: str, steps: int, seed: int,
                  progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.interface import checks
        from diffbase.methods.dreamo.mechanism.files import recipe
        from diffbase.methods.dreamo.mechanism.generate import DreamOSettings
        from diffbase.methods.dreamo.method import DREAMO, check_prompt

        h, w = checked_size(size, 16, app.limits)
        checks.count(steps, "steps")
        slots = [(checked_image(r, f"reference {k}", app.limits), t, None, None) if r else None
                 for k, (r, t) in enumerate(((ref1, task1), (ref2, task2)), start=1)]  # fmt: skip
        if not any(slots):
            raise UserError("references: upload at least one")
        check_prompt(prompt, slots, "prompt")
        loaded = app.models.get(("dreamo", model, dreamo, version),
                            lambda: DREAMO.load(model, dreamo, version, **app.rt.loader()))  # fmt: skip
        settings = DreamOSettings(prompt=prompt, height=h, width=w, steps=int(steps), seed=int(seed),
                                  guidance=recipe(version).guidance)  # fmt: skip
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
