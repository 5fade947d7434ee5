"""Training methods, one module each, registered by name (see registry.py). Importing this package
registers the built-in ones: lora, full_finetune, dreambooth, controlnet, vton, dreamfit, dreamo, kontext,
fill, upscale_dino."""

from diffbase.methods import controlnet, dreambooth, dreamfit, dreamo, edit, full_finetune, lora, upscale, vton  # noqa: F401
from diffbase.methods.registry import METHODS, Method, Trained, Validation, get, register

__all__ = ["METHODS", "Method", "Trained", "Validation", "get", "register", "train"]


def train(config, resume=None, stop_after=None, show_progress=True, overwrite=False):  # noqa: ANN001, ANN201
    """`diffbase train`: the configured method trained by the one loop (diffbase.training)."""
    from diffbase.training.train import train as run

    return run(config, get(config.training.method), resume, stop_after, show_progress, overwrite)
