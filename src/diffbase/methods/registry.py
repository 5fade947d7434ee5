"""The registry of training methods: `register` makes `training.method: <name>` (and its config
section) known; the record's type is diffbase.training.seam.Method. Adding a method is one package
whose `method` module calls `register`; nothing else in the package changes.
"""

from __future__ import annotations

from diffbase.config import ALIASES, register_alias, register_method_name, register_section
from diffbase.errors import UserError, closest
from diffbase.training.seam import Loss, Method, Trained, Validation

__all__ = ["METHODS", "Loss", "Method", "Trained", "Validation", "get", "register"]

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `training.method: <name>` (and its config section) known."""
    if method.section is not None:
        register_section(*method.section)
    register_method_name(method.name)
    for old in method.aliases:
        register_alias(old, method.name)
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise UserError(f"training.method: unknown method '{name}'{closest(name, list(METHODS))}")
    return METHODS[name]
