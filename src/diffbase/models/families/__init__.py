"""The families, one module each (sd15, sdxl, sd3, flux1, flux2), each holding its spec rows and its
behaviour as a `Family` record. `get(name)` is how everything else reaches a family's behaviour; nothing
outside this package compares family names.

A new family is one more module here that defines FAMILY (found by name, as every module of this package
that is not a helper), plus its configs. A family of one's own, outside diffbase, is added with
DIFFBASE_FAMILIES=my_pkg.my_family (comma-separated module paths), or `register(FAMILY)`.
"""

from __future__ import annotations

from importlib import import_module

from diffbase.config import register_family_name
from diffbase.errors import UserError, closest
from diffbase.models.families.record import Family, FamilySpec, TextEncoderSpec

HELPERS = {"record", "types", "unet", "flux"}  # what families share; no FAMILY in them
ORDER = ("sd15", "sdxl", "sd3", "flux1", "flux2")  # the order lists show; a new module comes after these
FAMILIES: dict[str, Family] = {}

__all__ = ["FAMILIES", "Family", "FamilySpec", "TextEncoderSpec", "get", "names", "register", "require"]


def register(family: Family) -> Family:
    """Make `model.family: <name>` known, with its spec rows (a pipeline already known keeps its family)."""
    FAMILIES[family.name] = family
    register_family_name(family.name)
    return family


def modules() -> list[str]:
    """The built-in family modules (every module of this package but the helpers), then DIFFBASE_FAMILIES."""
    from diffbase.discovery import module_paths

    return module_paths(__name__, __path__, ORDER, HELPERS, "DIFFBASE_FAMILIES")


def _load() -> dict[str, Family]:
    for module in modules():
        try:
            family = import_module(module).FAMILY
        except ModuleNotFoundError as err:
            raise UserError(f"DIFFBASE_FAMILIES: no module {module!r} ({err})") from None
        if family.name not in FAMILIES:
            register(family)
    return FAMILIES


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"model.family: unknown family '{name}'{closest(name, names())}; expected one of {names()}")
    return FAMILIES[name]


def require(family: str, wanted: str, message: str) -> None:
    """A method or command that runs on one family only: `message` (naming the key or flag) for another."""
    if family != wanted:
        raise UserError(message)


_load()
