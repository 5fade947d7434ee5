"""The web UI's upscale tab: the fields of `diffbase upscale`, checked as the command checks them, run through the same
load / run."""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import App, checked_image, example


def tab(app: App) -> None:
    import gradio as gr

    def upscale(image: str, model: str, scale: float, strength: float, steps: int, seed: int,
                progress: Any = app.tracked) -> Image.Image:  # fmt: skip
        from diffbase.interface import checks
        from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, plan
        from diffbase.methods.upscale.method import UPSCALE, vae_factor

        checks.model_folder(model, family="flux1", job="upscaling")
        checks.number(scale, "scale", low=0, low_open=True)
        checks.number(strength, "strength", 0, 1, low_open=True)
        checks.count(steps, "steps")
        picture = checked_image(image, "image", app.limits)
        factor = vae_factor(model)
        tile = 128 * factor  # the model's native size, overlapped by an eighth as the command does
        settings = UpscaleSettings(scale=float(scale), strength=float(strength), steps=int(steps), seed=int(seed),
                                   max_pixels=app.limits.max_pixels, tile=tile, overlap=tile // 8)  # fmt: skip
        (w, h), tiles = plan(picture.size, settings, factor, tile, "scale")
        if tiles > app.limits.max_tiles:
            raise UserError(
                f"scale: a {w}x{h} result takes {tiles} tiles, more than this server's {app.limits.max_tiles}"
            )
        loaded = app.load(("upscale", model), lambda: UPSCALE.load(model, **app.rt.loader()),
                          lambda v: [v[0].transformer])  # fmt: skip
        return UPSCALE.run(loaded, {"image": picture, "progress": True}, settings)

    with gr.Tab("Upscale", id="upscale"):
        u_image = app.upload("image", "up-image", example("edits/source/00000.png"))
        with gr.Row():
            u_model = gr.Textbox(label="FLUX.1 model folder", value=app.defaults.flux1)
            u_scale, u_strength = (
                gr.Number(label="scale", value=2.0),
                gr.Slider(0.05, 1.0, value=0.35, label="strength"),
            )
            _, u_steps, u_seed = app.sampling(None, 8)  # the size follows the scale
        u_run, u_result = app.action("Upscale", "upscale")
        app.wire(u_run, upscale, [u_image, u_model, u_scale, u_strength, u_steps, u_seed], u_result, "Upscale")
