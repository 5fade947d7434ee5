"""A family that lives outside diffbase (DIFFBASE_FAMILIES=tests.toy_family, or families.register): SD1.5's
classes and behaviour under another name, so the test can show that a new family needs no change to src/."""

from __future__ import annotations

from dataclasses import replace

from diffbase.models.families import sd15

SPEC = replace(sd15.SPECS[0], name="toy_sd", family="toy_sd", variants=("tiny",))
FAMILY = replace(sd15.FAMILY, name="toy_sd", title="Toy SD", specs=(SPEC,))
