"""EMA that is used: with `training.ema` on, the exported LoRA is the EMA's average (not the last weights),
validation runs on it, and `start_step` / `update_every` decide when it moves."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffbase.config import load_config
from diffbase.errors import UserError
from tests.helpers import SHAPES, TINY_EXPERIMENTS


def run(tmp_path, *overrides: str):
    from diffbase.methods import train

    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    config = load_config(path, ["training.max_steps=4", "training.checkpoint_every=0", "training.validation.steps=2",
                                f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}",
                                "training.learning_rate=0.05", *overrides])  # fmt: skip
    return train(config, show_progress=False)


def exported_and_named(result, out) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """The diffusers-format export, and the export key of each trained parameter (by id)."""
    files = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    names = {id(p): "transformer." + n.replace(".default", "") for n, p in result.trained.modules["denoiser"]
             .named_parameters() if p.requires_grad}  # fmt: skip
    return files, names


def test_the_export_is_the_ema_average_and_validation_says_so(tmp_path, capsys) -> None:
    result = run(tmp_path, "training.ema.enabled=true", "training.ema.decay=0.5")
    assert "validation and the exports use the EMA weights" in capsys.readouterr().out
    files, names = exported_and_named(result, tmp_path)
    shadow = result.ema.shadow_params
    params = result.trained.trainable
    assert len(shadow) == len(params) > 0
    moved = 0
    for p, s in zip(params, shadow, strict=True):
        exported = files[names[id(p)]].float()
        torch.testing.assert_close(exported, s.float().cpu(), rtol=0, atol=1e-6)  # the EMA's, not the last weights
        moved += int(not torch.allclose(p.detach().cpu(), s.cpu()))
    assert moved > 0  # the average differs from the last weights, so this test could fail


def test_without_ema_the_export_is_the_last_weights(tmp_path) -> None:
    result = run(tmp_path)
    files, names = exported_and_named(result, tmp_path)
    for p in result.trained.trainable:
        torch.testing.assert_close(files[names[id(p)]].float(), p.detach().float().cpu(), rtol=0, atol=1e-6)


def test_start_step_keeps_the_average_equal_to_the_weights_until_then(tmp_path) -> None:
    result = run(tmp_path, "training.ema.enabled=true", "training.ema.decay=0.5", "training.ema.start_step=10")
    for p, s in zip(result.trained.trainable, result.ema.shadow_params, strict=True):
        torch.testing.assert_close(s.cpu(), p.detach().cpu())  # 4 steps < start_step 10: a copy


def test_bad_ema_settings_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="training.ema: expected decay in"):
        run(tmp_path, "training.ema.enabled=true", "training.ema.update_every=0")


def test_bad_ema_settings_stop_before_anything_loads_or_is_written(tmp_path) -> None:
    from tests.helpers import run_cli

    path = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
    out = tmp_path / "run"
    code, _, err = run_cli("train", str(path), f"experiment.output_dir={out}", "training.ema.enabled=true",
                           "training.ema.decay=1.5")  # fmt: skip
    assert code == 2 and "training.ema" in err and len(err.strip().splitlines()) == 1 and not out.exists()
