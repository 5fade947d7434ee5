"""The table of spec rows (which diffusers and transformers classes make each pipeline of a family),
gathered from the family modules (models/families/): data the builders and loaders read."""

from __future__ import annotations

from diffbase.errors import UserError, closest
from diffbase.models.families import FamilySpec, TextEncoderSpec, get, names

__all__ = ["FamilySpec", "TextEncoderSpec", "pipelines", "rows", "spec_for", "spec_for_pipeline"]


def rows() -> dict[str, FamilySpec]:
    """Every family's spec rows by name, read now (a family registered later has its rows too)."""
    return {spec.name: spec for name in names() for spec in get(name).specs}


def pipelines() -> dict[str, FamilySpec]:
    """The spec row of each pipeline class; where two families name one class, the first registered keeps it."""
    out: dict[str, FamilySpec] = {}
    for spec in rows().values():
        out.setdefault(spec.pipeline, spec)
    return out


def __getattr__(name: str) -> dict[str, FamilySpec]:
    """FAMILIES (the spec rows by name) and PIPELINE_TO_SPEC, always as the families are now."""
    if name == "FAMILIES":
        return rows()
    if name == "PIPELINE_TO_SPEC":
        return pipelines()
    raise AttributeError(f"module 'diffbase.models.specs' has no attribute {name!r}")


def spec_for(family: str, variant: str = "") -> FamilySpec:
    """The spec for a config's `model.family` and `model.variant`."""
    matches = [s for s in rows().values() if s.family == family]
    if not matches:
        known = sorted({s.family for s in rows().values()})
        raise UserError(f"model.family: unknown family '{family}'{closest(family, known)}; expected one of {known}")
    for spec in matches:
        if variant in spec.variants:
            return spec
    if not variant and len(matches) >= 1:
        return matches[0]
    variants = [v for s in matches for v in s.variants]
    raise UserError(
        f"model.variant: '{variant}' is not a {family} variant{closest(variant, variants)}; expected one of {variants}"
    )


def spec_for_pipeline(class_name: str, where: str) -> FamilySpec:
    """The spec for a diffusers folder whose model_index.json names `class_name`."""
    table = pipelines()
    if class_name not in table:
        raise UserError(f"{where}: pipeline '{class_name}' is not a supported family; expected one of {sorted(table)}")
    return table[class_name]
