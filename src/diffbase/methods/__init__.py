"""Training methods, each registered by name (registry.py; the record's type is training/seam.py).

A method is a module (the trainers: lora, full_finetune, dreambooth, controlnet) or a package
(the paper methods: tryon, dreamfit, dreamo, edit, upscale) whose parts are found by name:

    method.py     the Method record; importing it registers the method
    mechanism/    what the method computes (or mechanism.py), below the record
    command.py    add_parsers(sub): its `diffbase` command(s)            (optional)
    ui.py         tab(app): its web UI tab                               (optional)
    bench.py      STAGES: its GPU benchmark stages                       (optional)

The CLI, the web app and benchmarks/gpu.py loop over `packages()`; nothing else names a method.
Importing this package is light (`diffbase --help` reads the command modules without torch);
`load_all()` imports and registers every method. A user's own method package is added with
DIFFBASE_METHODS=my_pkg.my_method (comma-separated module paths), no change to diffbase.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

HELPERS = {"registry", "text_to_image"}  # what methods share; no method in them
ORDER = ("lora", "full_finetune", "dreambooth", "controlnet", "tryon", "dreamfit", "dreamo", "edit", "upscale")
REGISTERED = ("METHODS", "Method", "Trained", "Validation", "get", "register")

__all__ = ["load_all", "packages", "part", "train", *REGISTERED]


def packages() -> list[str]:
    """Every module and package of diffbase.methods but the helpers, in ORDER (how help lists them) then a new one
    by name, so a new method is its package alone; then those named in DIFFBASE_METHODS."""
    from diffbase.discovery import module_paths

    return module_paths(__name__, __path__, ORDER, HELPERS, "DIFFBASE_METHODS")


def part(package: str, name: str) -> ModuleType | None:
    """A method's part (`command`, `ui`, `bench`, `method`) imported, or None when it has none. A module
    method (no package) is its own `method` and has no other part."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        from diffbase.errors import UserError

        raise UserError(f"DIFFBASE_METHODS: no module {package!r} (expected an importable module path)")
    if spec.submodule_search_locations is None:  # a plain module
        return importlib.import_module(package) if name == "method" else None
    if importlib.util.find_spec(f"{package}.{name}") is None:
        return None
    return importlib.import_module(f"{package}.{name}")


def load_all() -> dict[str, Any]:
    """Every method imported and registered: {name: Method}."""
    for package in packages():
        part(package, "method")
    from diffbase.methods.registry import METHODS

    return METHODS


def __getattr__(name: str) -> Any:
    """The registry's names load every method first, so `from diffbase.methods import get` finds them all."""
    if name in REGISTERED:
        load_all()
        from diffbase.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'diffbase.methods' has no attribute {name!r}")


def train(config, resume=None, stop_after=None, show_progress=True, overwrite=False):  # noqa: ANN001, ANN201
    """`diffbase train`: the configured method trained by the one loop (diffbase.training)."""
    from diffbase.methods.registry import get
    from diffbase.training.train import train as run

    load_all()
    return run(config, get(config.training.method), resume, stop_after, show_progress, overwrite)
