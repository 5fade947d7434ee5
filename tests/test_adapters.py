"""Adapters through peft (LoRA, DoRA, rsLoRA, LoKr, LoHa; a LoRA on the CLIP text encoders) and starting from a
LoRA file: what a run trains is what its exported files give back when loaded onto a fresh copy of the base, the
way users load them (`generate --lora`), and a continued run starts where the file is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffbase.config import load_config
from diffbase.errors import UserError
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli

PROMPT = "a red square on white"


def experiment(family: str) -> object:
    return next(p for p in TINY_EXPERIMENTS if p.name == f"{family}_lora.yaml")


def config_for(tmp_path, family: str, *overrides: str):
    return load_config(experiment(family), ["training.max_steps=3", "training.checkpoint_every=0",
                       "training.validation.steps=2", f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}",
                       "training.learning_rate=0.05", "training.validation.prompts=[]", *overrides])  # fmt: skip


def trained(tmp_path, family: str, *overrides: str):
    from diffbase.methods import train

    return train(config_for(tmp_path, family, *overrides), show_progress=False)


def picture(pipe, spec) -> np.ndarray:
    """Two sampling steps at 64 px as floats: every component the LoRA touches (text encoders too) shows."""
    from diffbase.generate import GenerateSettings, pipeline_kwargs
    from diffbase.models.backbone import text_length

    settings = GenerateSettings(prompt=PROMPT, seed=3, steps=2, height=64, width=64)
    with torch.inference_mode():
        return pipe(**pipeline_kwargs(spec, settings), **text_length(pipe, spec.family), output_type="np").images[0]


def fresh(config):
    """The same base the run started from (tiny models are built from the seed), nothing added."""
    from diffbase.training.train import load_backbone

    return load_backbone(config)


def loaded(config, *files: str):
    from diffbase.models.lora_loading import apply_loras

    bb = fresh(config)
    apply_loras(bb.pipe, bb.spec, list(files))
    return picture(bb.pipe, bb.spec)


@pytest.mark.parametrize(("kind", "formats"), [("lora", {"diffusers", "kohya"}), ("dora", {"diffusers"}),
                                               ("rslora", {"diffusers", "kohya"}), ("lokr", {"lycoris"}),
                                               ("loha", {"lycoris"})])  # fmt: skip
def test_each_adapter_type_exports_files_that_load_back_to_what_trained(tmp_path, kind, formats) -> None:
    result = trained(tmp_path, "flux1", f"training.lora.type={kind}")
    config, bb = config_for(tmp_path, "flux1"), result.backbone
    exports = __import__("json").loads((tmp_path / "exports.json").read_text())
    assert set(exports) == formats
    want = picture(bb.pipe, bb.spec)
    base = picture(*(lambda b: (b.pipe, b.spec))(fresh(config)))
    assert np.abs(want - base).max() > 0.02  # the adapter changed the picture, so a lost adapter would show
    for name in formats:
        got = loaded(config, exports[name])
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=name)  # float32 merges vs. peft's separate path


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path) -> None:
    result = trained(tmp_path, "flux1", "training.lora.type=rslora", "training.lora.rank=4", "training.lora.alpha=4")
    scales = {m.scaling["default"] for m in result.backbone.denoiser.modules() if hasattr(m, "scaling")}
    assert scales == {4 / 4**0.5}


def test_lycoris_file_names_and_shapes_are_comfyui_s(tmp_path) -> None:
    trained(tmp_path, "flux1", "training.lora.type=lokr", "training.lora.rank=4")
    state = load_file(str(tmp_path / "lora" / "lora_lycoris.safetensors"))
    assert all(k.startswith("lycoris_") for k in state)  # SimpleTuner's names, which ComfyUI maps for FLUX
    assert any(k.endswith(".lokr_w1") for k in state) and any(".lokr_w2" in k for k in state)
    trained(tmp_path / "sd", "sd15", "training.lora.type=loha")
    state = load_file(str(tmp_path / "sd" / "lora" / "lora_lycoris.safetensors"))
    assert all(k.startswith("lora_unet_") for k in state)  # kohya's UNet names
    layers = {k.rsplit(".", 1)[0] for k in state}
    assert all(f"{name}.alpha" in state and f"{name}.hada_w2_b" in state for name in layers)


@pytest.mark.parametrize("family", ["sd15", "flux1"])
def test_text_encoder_lora_trains_with_its_own_rate_and_loads_back(tmp_path, family) -> None:
    result = trained(tmp_path, family, "training.lora.train_text_encoder=true", "training.lora.text_encoder_lr=0.01")
    bb, config = result.backbone, config_for(tmp_path, family)
    encoder = bb.pipe.text_encoder
    ups = [p for n, p in encoder.named_parameters() if "lora_B" in n]
    assert ups and any(p.abs().sum() > 0 for p in ups)  # trained: B starts at zero
    exports = __import__("json").loads((tmp_path / "exports.json").read_text())
    assert any(k.startswith("text_encoder.") for k in load_file(exports["diffusers"]))
    prefix = "lora_te_" if family == "sd15" else "lora_te1_"
    assert any(k.startswith(prefix) for k in load_file(exports["kohya"]))
    want = picture(bb.pipe, bb.spec)
    for name in ("diffusers", "kohya"):
        np.testing.assert_allclose(loaded(config, exports[name]), want, atol=2e-4, err_msg=name)


def test_text_encoder_rate_is_its_own_group() -> None:
    from diffbase.training.optimizers import make_optimizer

    config = load_config(experiment("sd15"), ["training.learning_rate=0.1"])
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([a, b], config, [{"params": [a]}, {"params": [b], "lr": 0.01}])
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]


@pytest.mark.parametrize(("overrides", "key"), [
    (["training.lora.train_text_encoder=true", "data.cache_text=true"], "data.cache_text"),
    (["training.lora.train_text_encoder=true", "training.lora.type=lokr"], "training.lora.train_text_encoder"),
    (["training.lora.init_from=/nowhere/lora.safetensors"], "training.lora.init_from"),
])  # fmt: skip
def test_settings_that_cannot_work_stop_before_loading(tmp_path, overrides, key) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli("train", str(experiment("flux1")), f"experiment.output_dir={out}", *overrides)
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_text_encoder_lora_on_flux2_says_its_files_carry_none(tmp_path) -> None:
    with pytest.raises(UserError, match="carry no text encoder"):
        trained(tmp_path, "flux2", "training.lora.train_text_encoder=true", "training.max_steps=1")


def denoiser_output(bb, seed: int = 5) -> torch.Tensor:
    """The picture of a backbone: what a continued run starts from."""
    return torch.from_numpy(picture(bb.pipe, bb.spec))


@pytest.mark.parametrize(("family", "kind", "file"), [
    ("flux1", "lora", "pytorch_lora_weights.safetensors"),
    ("flux1", "dora", "pytorch_lora_weights.safetensors"),
    ("sd15", "lora", "lora_kohya.safetensors"),
    ("flux1", "lokr", "lora_lycoris.safetensors"),
])  # fmt: skip
def test_init_from_starts_where_the_file_is(tmp_path, family, kind, file) -> None:
    from diffbase.methods import lora

    first = trained(tmp_path / "a", family, f"training.lora.type={kind}", "training.lora.alpha=8")
    want = denoiser_output(first.backbone)
    source = tmp_path / "a" / "lora" / file
    config = config_for(tmp_path / "b", family, f"training.lora.type={kind}", f"training.lora.init_from={source}")
    bb = fresh(config)  # alpha 16 here, 8 in the file: the file's scale is carried over
    lora.prepare(bb, config)
    torch.testing.assert_close(denoiser_output(bb), want, atol=2e-4, rtol=0)


def test_init_from_a_file_of_another_rank_says_so(tmp_path) -> None:
    from diffbase.methods import lora

    trained(tmp_path / "a", "flux1", "training.lora.rank=4")
    source = tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors"
    config = config_for(tmp_path / "b", "flux1", "training.lora.rank=8", f"training.lora.init_from={source}")
    with pytest.raises(UserError, match="training.lora.init_from: .*shape"):
        lora.prepare(fresh(config), config)
