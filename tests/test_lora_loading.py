"""LoRA files in diffusers, kohya/ComfyUI and XLabs layouts give the pixels of the adapter they came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffbase.generate import GenerateSettings, pipeline_kwargs
from diffbase.models.loading import load_pipeline
from diffbase.models.lora_formats import peft_scales, save_diffusers_lora, save_lora, to_kohya, to_xlabs
from diffbase.models.lora_loading import apply_loras, linear_widths, parse_lora_arg
from tests.helpers import run_cli

TARGETS = {
    "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux1": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def image(pipe, spec) -> np.ndarray:
    s = GenerateSettings(prompt="a photo of a cat", seed=1, steps=2, height=64, width=64, guidance=3.5)
    with torch.no_grad():
        return pipe(**pipeline_kwargs(spec, s), output_type="np").images[0]


@pytest.fixture(scope="module", params=["sd15", "flux1"])
def trained(request, tiny_model, tmp_path_factory):
    """A random non-zero LoRA on a tiny model: its image, and the adapter in every layout."""
    family = request.param
    folder = tiny_model(family)
    pipe, spec = load_pipeline(folder)
    base = image(pipe, spec)
    denoiser = getattr(pipe, spec.denoiser)
    torch.manual_seed(0)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False))
    for name, p in denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    adapted = image(pipe, spec)
    state = {f"{spec.denoiser}.{k}": v for k, v in get_peft_model_state_dict(denoiser).items()}
    scales = peft_scales(denoiser, spec.denoiser)
    out = tmp_path_factory.mktemp(f"lora_{family}")
    files = {}
    files["diffusers"] = save_diffusers_lora(pipe.__class__, out / "diffusers", spec.denoiser, denoiser)
    widths = linear_widths(denoiser, spec.denoiser)
    files["kohya"] = save_lora(to_kohya(state, scales, family, widths), out / "kohya.safetensors")
    if family == "flux1":
        files["xlabs"] = save_lora(to_xlabs(state, scales), out / "xlabs.safetensors")
    return folder, base, adapted, files


def test_every_layout_reproduces_the_adapter(trained) -> None:
    folder, base, adapted, files = trained
    assert np.abs(adapted - base).max() > 1e-3  # the adapter does something
    expected = {"diffusers", "kohya", "xlabs"} if "flux1" in str(folder) else {"diffusers", "kohya"}
    assert set(files) == expected
    for layout, file in files.items():
        pipe, spec = load_pipeline(folder)
        apply_loras(pipe, spec, [str(file)])
        np.testing.assert_allclose(image(pipe, spec), adapted, atol=2e-5, err_msg=layout)


def test_scale_zero_is_the_base_model_and_half_is_between(trained) -> None:
    folder, base, adapted, files = trained
    pipe, spec = load_pipeline(folder)
    apply_loras(pipe, spec, [f"{files['kohya']}:0"])
    np.testing.assert_allclose(image(pipe, spec), base, atol=2e-5)
    pipe, spec = load_pipeline(folder)
    apply_loras(pipe, spec, [f"{files['diffusers']}:0.5"])
    half = image(pipe, spec)
    assert np.abs(half - base).mean() < np.abs(adapted - base).mean()
    assert np.abs(half - adapted).mean() < np.abs(adapted - base).mean()


def test_parse_lora_arg() -> None:
    assert parse_lora_arg("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora_arg("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert parse_lora_arg("C:/x/b.safetensors") == (Path("C:/x/b.safetensors"), 1.0)


def test_lora_errors_through_the_cli(trained, tiny_model, tmp_path: Path) -> None:
    folder, _, _, files = trained
    other = tiny_model("sd15" if "flux1" in str(folder) else "flux1")

    def error(lora: str, model: Path = folder) -> str:
        out = tmp_path / "x.png"
        code, _, err = run_cli(
            "generate",
            "--model",
            str(model),
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--size",
            "64x64",
            "--lora",
            lora,
            "--out",
            str(out),
        )
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()
        return err

    assert "LoRA file not found" in error(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert "not a readable safetensors file" in error(str(junk))
    not_lora = tmp_path / "weights.safetensors"
    save_lora({"conv.weight": torch.zeros(2, 2)}, not_lora)
    assert "no LoRA weights found" in error(str(not_lora))
    assert "a LoRA for a" in error(str(files["kohya"]), model=other)
    unet_lora = tmp_path / "sd15.safetensors"  # diffusers' UNet names hold `transformer_blocks.` as FLUX's do
    save_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4)},
              unet_lora)  # fmt: skip
    flux = folder if "flux1" in str(folder) else other
    assert "a LoRA for a UNet model" in error(str(unet_lora), model=flux)
