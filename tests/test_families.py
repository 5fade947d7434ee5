"""Each family is one module (models/families/<name>.py) that holds its spec rows and its behaviour: every
other module reaches a family through `families.get`, so no family name is compared outside that package,
and every family's record is complete for what the rest of diffbase asks of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diffbase.models import families
from diffbase.models.specs import FAMILIES as ROWS

SRC = Path(__file__).resolve().parents[1] / "src" / "diffbase"


def family_literals(node: ast.AST) -> list[str]:
    names = set(families.names())
    found = []
    parts = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
    parts += list(node.keys) if isinstance(node, ast.Dict) else []
    for part in parts:
        items = part.elts if isinstance(part, ast.Tuple | ast.Set | ast.List) else [part]
        found += [e.value for e in items if isinstance(e, ast.Constant) and e.value in names]
    return found


def test_no_family_name_is_compared_outside_the_families_package() -> None:
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        if "families" in file.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Compare | ast.Dict) and family_literals(node):
                offenders.append(f"{file.relative_to(SRC)}:{node.lineno} {family_literals(node)}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", families.names())
def test_a_family_record_is_complete(name: str) -> None:
    family = families.get(name)
    assert family.specs and all(spec.family == name for spec in family.specs)
    assert all(ROWS[spec.name] is spec for spec in family.specs)  # the spec table is the modules' rows
    assert family.size_multiple in (8, 16) and family.lora_targets and family.lora_markers and family.title
    is_transformer = family.specs[0].denoiser == "transformer"
    assert (family.tokens is not None) <= is_transformer  # only transformers lay latents out as tokens


def test_an_unknown_family_names_the_closest() -> None:
    from diffbase.errors import UserError

    with pytest.raises(UserError, match="unknown family 'flux3'.*did you mean 'flux"):
        families.get("flux3")
