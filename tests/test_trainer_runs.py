"""What a run writes while it goes on and what the design document's configs ask for: exports every N steps (each
with its validation grid), DreamBooth with full weights or a LoRA, with the text encoder or without, and the
document's own spellings read as diffbase's names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffbase.config import configs_dir, load_config
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli


def experiment(name: str):
    return next(p for p in TINY_EXPERIMENTS if p.name == f"{name}.yaml")


def train(tmp_path, name: str, *overrides: str):
    from diffbase.methods import train as run

    config = load_config(experiment(name), ["training.checkpoint_every=0", "training.validation.steps=2",
                         f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}", *overrides])  # fmt: skip
    return run(config, show_progress=False)


def test_exports_every_n_steps_are_whole_and_equal_a_run_that_stopped_there(tmp_path) -> None:
    train(tmp_path / "long", "flux1_lora", "training.max_steps=4", "training.export_every=2")
    step2 = tmp_path / "long" / "exports" / "step-000002"
    files = json.loads((step2 / "exports.json").read_text())
    assert set(files) == {"diffusers", "kohya"} and (step2 / "validation.png").is_file()
    assert not (tmp_path / "long" / "exports" / "step-000004").exists()  # the last step is the run's own export
    train(tmp_path / "short", "flux1_lora", "training.max_steps=2")  # constant schedule: the same first two steps
    during = load_file(files["diffusers"])
    final = load_file(str(tmp_path / "short" / "lora" / "pytorch_lora_weights.safetensors"))
    assert during.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(during[key], final[key], rtol=1e-5, atol=1e-6)


def test_dreambooth_full_weights_with_the_text_encoder(tmp_path) -> None:
    from diffbase.training.train import load_backbone

    result = train(tmp_path, "sd15_dreambooth", "training.max_steps=2", "training.dreambooth.train=full",
                   "training.dreambooth.train_text_encoder=true", "training.learning_rate=1e-3")  # fmt: skip
    files = json.loads((tmp_path / "exports.json").read_text())
    assert set(files) == {"denoiser", "text_encoder"}
    assert result.finished
    base = load_backbone(load_config(experiment("sd15_dreambooth"))).pipe  # the same seed: the starting weights
    for name, module in (("unet", base.unet), ("text_encoder", base.text_encoder)):
        saved = load_file(str(next((tmp_path / name).glob("*.safetensors"))))
        before = dict(module.state_dict())
        changed = [k for k, v in saved.items() if k in before and not torch.equal(v, before[k].to(v.dtype))]
        assert changed, name  # both trained


def test_dreambooth_lora_with_the_text_encoder(tmp_path) -> None:
    train(tmp_path, "sd15_dreambooth", "training.max_steps=2", "training.dreambooth.train_text_encoder=true")
    files = json.loads((tmp_path / "exports.json").read_text())
    assert any(k.startswith("text_encoder.") for k in load_file(files["diffusers"]))


def test_the_documents_spellings_are_read_and_shown_canonically(tmp_path) -> None:
    path = tmp_path / "db.yaml"
    path.write_text(f"_base_: [{experiment('sd15_dreambooth')}]\n"
                    "training:\n  dreambooth: {prior_preservation_weight: 0.25, num_class_images: 3}\n"
                    "  optimizer: {type: adamw, lr: 2.0e-5}\n"
                    "data: {bucket_resolution_steps: 32, min_bucket_resolution: 64, max_bucket_resolution: 96}\n")  # fmt: skip
    config = load_config(path)
    assert config.training.dreambooth.prior_loss_weight == 0.25 and config.training.learning_rate == 2e-5
    assert (config.data.bucket_step, config.data.min_bucket_side, config.data.max_bucket_side) == (32, 64, 96)
    code, out, _ = run_cli("config", "show", str(path))
    assert code == 0 and "bucket_step: 32" in out and "bucket_resolution_steps" not in out


def test_both_spellings_in_one_file_is_one_line_naming_the_key(tmp_path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text(f"_base_: [{experiment('flux1_lora')}]\ndata: {{bucket_step: 64, bucket_resolution_steps: 32}}\n")
    code, _, err = run_cli("train", str(path), f"experiment.output_dir={tmp_path / 'out'}")
    assert code == 2 and "data.bucket_resolution_steps" in err and "data.bucket_step" in err
    assert len(err.strip().splitlines()) == 1


def test_a_command_line_value_wins_over_the_documents_spelling_in_a_file() -> None:
    config = load_config(experiment("seed_example"), ["data.bucket_step=64", "training.learning_rate=0.5"])
    assert config.data.bucket_step == 64 and config.training.learning_rate == 0.5


@pytest.mark.parametrize("name", ["seed_example"])
def test_the_documents_example_experiment_trains_validates_and_exports(tmp_path, name) -> None:
    assert experiment(name).parent == configs_dir() / "experiments" / "tiny"
    result = train(tmp_path, name, "training.max_steps=2")
    assert result.finished and (tmp_path / "validation" / "step-000002.png").is_file()
    files = json.loads((tmp_path / "exports.json").read_text())
    assert set(files) == {"diffusers", "kohya"}
