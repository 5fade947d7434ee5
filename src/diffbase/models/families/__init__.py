"""The families, one module each (sd15, sdxl, sd3, flux1, flux2), each holding its spec rows and its
behaviour as a `Family` record. `get(name)` is how everything else reaches a family's behaviour; nothing
outside this package compares family names. A new family is one more module here and its line in MODULES.
"""

from __future__ import annotations

from importlib import import_module

from diffbase.errors import UserError, closest
from diffbase.models.families.record import Family, FamilySpec, TextEncoderSpec

MODULES = ("sd15", "sdxl", "sd3", "flux1", "flux2")
FAMILIES: dict[str, Family] = {}

__all__ = ["FAMILIES", "Family", "FamilySpec", "TextEncoderSpec", "get", "names", "require"]


def _load() -> dict[str, Family]:
    if not FAMILIES:
        for name in MODULES:
            family = import_module(f"diffbase.models.families.{name}").FAMILY
            FAMILIES[family.name] = family
    return FAMILIES


def names() -> list[str]:
    return list(_load())


def get(name: str) -> Family:
    families = _load()
    if name not in families:
        raise UserError(f"model.family: unknown family '{name}'{closest(name, list(families))}; "
                        f"expected one of {list(families)}")  # fmt: skip
    return families[name]


def require(family: str, wanted: str, message: str) -> None:
    """A method or command that runs on one family only: `message` (naming the key or flag) for another."""
    if family != wanted:
        raise UserError(message)
