"""Each family is one module (models/families/<name>.py) that holds its spec rows and its behaviour: every
other module reaches a family through `families.get`, so no family name is compared outside that package,
and every family's record is complete for what the rest of diffbase asks of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diffbase.models import families
from diffbase.models.specs import rows

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
    assert all(rows()[spec.name] is spec for spec in family.specs)  # the spec table is the modules' rows
    assert family.size_multiple in (8, 16) and family.lora_targets and family.lora_markers and family.title
    is_transformer = family.specs[0].denoiser == "transformer"
    assert (family.tokens is not None) <= is_transformer  # only transformers lay latents out as tokens


def test_an_unknown_family_names_the_closest() -> None:
    from diffbase.errors import UserError

    with pytest.raises(UserError, match="unknown family 'flux3'.*did you mean 'flux"):
        families.get("flux3")


def test_a_family_from_the_test_directory_trains_and_draws_its_validation_images(tmp_path: Path) -> None:
    """Registered from outside the package, the family's name is a valid `model.family`, its rows build a
    model, and LoRA training runs through its behaviour to validation images (its pipeline drawing them)."""
    import json
    import os
    import subprocess
    import sys

    from diffbase.config import configs_dir
    from tests.helpers import SHAPES, run_cli
    from tests.toy_family import FAMILY

    base = configs_dir() / "experiments" / "tiny" / "sd15_lora.yaml"
    root = SRC.parents[1]
    env = {**os.environ, "DIFFBASE_FAMILIES": "tests.toy_family", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "diffbase.cli", "config", "show", str(base), "model.family=toy_sd"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "family: toy_sd" in proc.stdout, proc.stderr
    code, _, err = run_cli("config", "show", str(base), "model.family=toy_sdd")
    assert code == 2 and "model.family: expected one of" in err
    families.register(FAMILY)
    try:
        code, _, err = run_cli("train", str(base), "model.family=toy_sd", "training.max_steps=2",
                               f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}",
                               "training.validation.steps=2", "--quiet")  # fmt: skip
        assert code == 0, err
        assert json.loads((tmp_path / "exports.json").read_text())  # the LoRA files
        assert list((tmp_path / "validation").glob("step-*.png"))
    finally:
        families.FAMILIES.pop("toy_sd", None)
