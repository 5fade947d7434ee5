"""The web UI's bias-only tab: prompt, model folder and biases file, run through the method's load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.interface.web import App, checked_size


def tab(app: App) -> None:
    import gradio as gr

    def generate(prompt: str, model: str, weights: str, size: str, steps: int, seed: int,
                 progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.generate import GenerateSettings
        from diffbase.interface import checks
        from tests.toy_method.method import BIAS_ONLY

        h, w = checked_size(size, 8, app.limits)
        checks.count(steps, "steps")
        checks.weights_file(weights, "biases file")
        loaded = app.models.get(
            ("bias_only", model, weights), lambda: BIAS_ONLY.load(model, weights, **app.rt.loader())
        )
        settings = GenerateSettings(prompt=prompt, seed=int(seed), steps=int(steps), height=h, width=w)
        return BIAS_ONLY.run(loaded, {}, settings)

    with gr.Tab("Bias only"):
        prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="bias-prompt")
        with gr.Row():
            model = gr.Textbox(label="model folder", value=app.defaults.sd15)
            weights = gr.Textbox(label="biases file", value="")
            size, steps, seed = app.sampling("32x32", 2)
        run, result = app.action("Generate", "bias")
        app.wire(run, generate, [prompt, model, weights, size, steps, seed], result)
