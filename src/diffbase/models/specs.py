"""The table of spec rows (which diffusers and transformers classes make each pipeline of a family),
gathered from the family modules (models/families/): data the builders and loaders read."""

from __future__ import annotations

from diffbase.errors import UserError, closest
from diffbase.models.families import FamilySpec, TextEncoderSpec, get, names

__all__ = ["FAMILIES", "FamilySpec", "TextEncoderSpec", "spec_for", "spec_for_pipeline"]


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for name in names() for spec in get(name).specs}
PIPELINE_TO_SPEC = {spec.pipeline: spec for spec in FAMILIES.values()}


def spec_for(family: str, variant: str = "") -> FamilySpec:
    """The spec for a config's `model.family` and `model.variant`."""
    matches = [s for s in FAMILIES.values() if s.family == family]
    if not matches:
        names = sorted({s.family for s in FAMILIES.values()})
        raise UserError(f"model.family: unknown family '{family}'{closest(family, names)}; expected one of {names}")
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
    if class_name not in PIPELINE_TO_SPEC:
        known = sorted(PIPELINE_TO_SPEC)
        raise UserError(f"{where}: pipeline '{class_name}' is not a supported family; expected one of {known}")
    return PIPELINE_TO_SPEC[class_name]
