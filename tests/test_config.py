"""Config loading: _base_ inheritance, overrides, typed validation and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffbase.config import Config, configs_dir, load_config
from diffbase.errors import UserError
from tests.helpers import run_cli


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    write(
        tmp_path / "models/m.yaml",
        "model:\n  family: flux1\n  variant: dev\n  vae: {scaling_factor: 0.3611, shift_factor: 0.1159}\n",
    )
    write(tmp_path / "training/t.yaml", "training:\n  learning_rate: 1.0e-4\n  batch_size: 2\n  lora: {rank: 8}\n")
    return write(
        tmp_path / "experiments/e.yaml",
        "_base_: [../models/m.yaml, ../training/t.yaml]\n"
        "experiment: {name: exp}\n"
        "training:\n  batch_size: 4\n  lora: {alpha: 4}\n",
    )


def test_base_files_merge_deep_in_order_with_the_file_last(experiment: Path) -> None:
    cfg = load_config(experiment)
    assert isinstance(cfg, Config)
    assert cfg.model.family == "flux1"
    assert cfg.model.vae["shift_factor"] == 0.1159
    assert cfg.training.batch_size == 4  # the file itself wins over its base
    assert cfg.training.learning_rate == 1e-4  # kept from the base
    assert (cfg.training.lora.rank, cfg.training.lora.alpha) == (8, 4.0)  # deep merge
    assert cfg.experiment.name == "exp"


def test_overrides_are_typed_yaml_values(experiment: Path) -> None:
    cfg = load_config(experiment, ["training.lora.rank=32", "model.dtype=bfloat16", "training.max_steps=10"])
    assert cfg.training.lora.rank == 32
    assert cfg.model.dtype == "bfloat16"
    assert cfg.training.max_steps == 10


def test_int_is_accepted_for_float(experiment: Path) -> None:
    assert load_config(experiment, ["training.learning_rate=1"]).training.learning_rate == 1.0


def test_unknown_key_names_file_dotted_key_and_closest_match(experiment: Path) -> None:
    write(experiment, experiment.read_text() + "  learning_rat: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(experiment)
    msg = str(err.value)
    assert str(experiment) in msg
    assert "training.learning_rat: unknown key (did you mean 'learning_rate'?)" in msg
    assert "\n" not in msg


def test_unknown_key_in_a_base_file_names_that_base(experiment: Path) -> None:
    base = experiment.parent.parent / "training/t.yaml"
    write(base, base.read_text() + "  bach_size: 3\n")
    with pytest.raises(
        UserError, match=r"training/t\.yaml: training\.bach_size: unknown key \(did you mean 'batch_size'\?\)"
    ):
        load_config(experiment)


def test_wrong_type_names_key_expected_and_found(experiment: Path) -> None:
    with pytest.raises(UserError, match=r"command line: training\.batch_size: expected an integer, got 'four'"):
        load_config(experiment, ["training.batch_size=four"])
    with pytest.raises(UserError, match=r"model\.dtype: expected one of 'float32', 'float16', 'bfloat16', got 'bf16'"):
        load_config(experiment, ["model.dtype=bf16"])


def test_missing_required_value(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "model:\n  variant: dev\n")
    with pytest.raises(UserError, match=r"x\.yaml: model\.family: required value is missing"):
        load_config(path)
    path = write(tmp_path / "y.yaml", "training: {batch_size: 1}\n")
    with pytest.raises(UserError, match=r"y\.yaml: model: required value is missing"):
        load_config(path)


def test_missing_base_and_cycles_and_bad_yaml(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "_base_: [nope.yaml]\n")
    with pytest.raises(UserError, match=r"a\.yaml: _base_: file not found: nope\.yaml"):
        load_config(a)
    write(tmp_path / "b.yaml", "_base_: [c.yaml]\n")
    c = write(tmp_path / "c.yaml", "_base_: [b.yaml]\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(c)
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: line \d+: not valid YAML"):
        load_config(bad)


def test_component_keys_are_checked_against_the_library_class(tmp_path: Path) -> None:
    from diffbase.models.build import build_components

    cfg = load_config(configs_dir() / "models/flux1_tiny.yaml", ["model.transformer.num_layer=2"]).model
    with pytest.raises(
        UserError,
        match=r"model\.transformer\.num_layer: not an argument of FluxTransformer2DModel \(did you mean 'num_layers'\?\)",
    ):
        build_components(cfg)


@pytest.mark.parametrize("path", sorted((configs_dir() / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_model_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.family in {"sd15", "sdxl", "sd3", "flux1", "flux2"}


def test_config_show_prints_resolved_config(experiment: Path) -> None:
    code, out, err = run_cli("config", "show", str(experiment), "training.lora.rank=3")
    assert code == 0, err
    assert "rank: 3" in out and "family: flux1" in out and "_base_" not in out


def test_config_show_bad_input_is_one_line_exit_2(experiment: Path) -> None:
    code, out, err = run_cli("config", "show", str(experiment), "training.epoch=3")
    assert code == 2
    assert err.startswith("error: command line: training.epoch: unknown key (did you mean 'epochs'?)")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli("config", "show", "/nonexistent/e.yaml")
    assert code == 2 and "e.yaml: config file not found" in err
    code, _, err = run_cli("config", "show", str(experiment), "noequals")
    assert code == 2 and "expected key=value" in err


def test_exponent_without_dot_is_a_number(experiment: Path) -> None:
    write(experiment, experiment.read_text() + "  learning_rate: 1e-4\n")
    assert load_config(experiment).training.learning_rate == 1e-4
    assert load_config(experiment, ["training.learning_rate=3e-5"]).training.learning_rate == 3e-5


def test_a_config_read_from_python_first_knows_every_family_and_method() -> None:
    """In a fresh process, load_config before anything imported a method (a user's script, a benchmark): the
    family and method names are registered on demand (benchmarks/train.py failed with 'expected one of , got
    sd15' before)."""
    import subprocess
    import sys

    from diffbase.config import configs_dir

    path = configs_dir() / "experiments" / "tiny" / "sdxl_dreambooth.yaml"
    code = f"from diffbase.config import load_config; c = load_config({str(path)!r}); print(c.model.family, c.training.method)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sdxl", "dreambooth"]
    # one method imported alone registers only itself: another method's section is still known
    path = configs_dir() / "experiments" / "tiny" / "flux1_dreamo.yaml"
    code = f"import diffbase.methods.lora; from diffbase.config import load_config; print(load_config({str(path)!r}).training.method)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dreamo"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.max_steps=0", "training.max_steps: expected a whole number at least 1, got 0"),
        ("training.max_steps=-5", "training.max_steps: expected a whole number at least 1, got -5"),
        ("training.batch_size=0", "training.batch_size: expected a whole number at least 1, got 0"),
        ("training.gradient_accumulation=0", "training.gradient_accumulation:"),
        ("training.learning_rate=-1", "training.learning_rate: expected a number above 0, got -1"),
        ("training.learning_rate=0", "training.learning_rate:"),
        ("training.learning_rate=.nan", "training.learning_rate:"),
    ],
)
def test_counts_and_the_learning_rate_no_run_can_use_are_refused_at_load(
    experiment: Path, override: str, expected: str
) -> None:
    # max_steps 0 used to "train" and export an untouched LoRA (exit 0); batch 0 and a negative rate were tracebacks
    with pytest.raises(UserError, match="^" + expected.replace(".", r"\.")):
        load_config(experiment, [override])
    assert load_config(experiment, ["training.max_steps=1"]).training.max_steps == 1


def test_epochs_is_checked_only_where_it_ends_the_run(experiment: Path) -> None:
    with pytest.raises(UserError, match=r"^training\.epochs: expected a whole number at least 1, got 0"):
        load_config(experiment, ["training.max_steps=null", "training.epochs=0"])
    assert load_config(experiment, ["training.max_steps=5", "training.epochs=0"]).training.max_steps == 5  # unread


def test_an_unreadable_config_is_one_line(experiment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 000 cannot stop root (the suite's user in CI), so the read itself fails as it does for anyone else
    real = Path.read_text

    def denied(self: Path, *args, **kwargs) -> str:
        if self == experiment:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = run_cli("config", "show", str(experiment))  # was a PermissionError traceback
    assert code == 2 and err == f"error: {experiment}: cannot read the config (Permission denied)\n", err
