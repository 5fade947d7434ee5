"""diffbase: train and run diffusion image-customization models from local weights."""

import os as _os

# Local-first: nothing in diffbase may reach a model hub at run time.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keeps optional-backend notices off the CLI
_os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"


def load_registries() -> None:
    """Every family and method registered (each module registers its names as it is imported). The config
    reader calls this before it checks `model.family` / `training.method`, so a config loaded from Python,
    not only through the CLI, knows every name; the package root wires it (the config layer names no layer
    above it)."""
    from diffbase.methods import load_all

    load_all()


def _wire_registries() -> None:
    from diffbase import config

    config.NAME_LOADERS.append(load_registries)


def _quiet_optional_backends() -> None:
    """torchao (installed for int8 bases) logs its optional CUDA kernels' load failures and torch's deprecation
    notes when diffusers looks it up, at every model load: warnings about someone else's code, not the user's."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft's LoRA on a torchao layer cannot merge; diffbase never merges into a quantized base
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")


_quiet_optional_backends()
_wire_registries()
