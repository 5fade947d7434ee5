"""Plug-in modules found by name: what the method registry and the family registry both do, so that a new method
or family is its own module alone, and one from outside diffbase is named in an environment variable."""

from __future__ import annotations

import os
import pkgutil


def module_paths(package: str, path: list[str], order: tuple[str, ...], helpers: set[str], env: str) -> list[str]:
    """The modules of `package` (its `__path__`), helpers left out: those in `order` first (how lists show them),
    then any other by name; then the module paths named in the environment variable `env` (comma-separated)."""
    found = {m.name for m in pkgutil.iter_modules(path)} - helpers
    ours = [f"{package}.{name}" for name in [*[n for n in order if n in found], *sorted(found - set(order))]]
    extra = [name.strip() for name in os.environ.get(env, "").split(",") if name.strip()]
    return ours + [name for name in extra if name not in ours]
