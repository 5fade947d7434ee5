"""Quantized frozen bases (issue 26) on a CPU: every backend that runs here (fp8 storage through diffusers'
layerwise casting, torchao int8, optimum-quanto qint8) trains a tiny FLUX.1 and SDXL LoRA through the one
loop to validation images and an export that loads on the unquantized base; int8 weights take about half
the bytes of bf16; generation runs on a quantized denoiser; bad settings are one line before any work.
The speed options (issue 31): int8dq (torchao int8 weights and activations) generates here, close to the
full-precision picture; fp8dq (float8 weights and activations) needs CUDA >= 8.9, so here only its refusals
(a CPU, an older GPU by its compute capability, another dtype, training) are tested."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from diffbase.config import configs_dir
from diffbase.models.quantize import module_bytes, quantize
from tests.helpers import run_cli, train_tiny

TINY = configs_dir() / "experiments" / "tiny"
TOY_FLUX = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


@pytest.mark.parametrize("family", ["flux1", "sdxl"])
@pytest.mark.parametrize("kind", ["fp8", "int8", "qint8"])
def test_a_lora_trains_on_a_quantized_base_and_loads_on_the_full_one(kind, family, tiny_model, tmp_path) -> None:
    from diffbase.methods import text_to_image

    code, _, err = train_tiny(TINY / f"{family}_lora.yaml", tmp_path, 2, f"model.quantize={kind}", "--quiet")
    assert code == 0, err
    exports = json.loads((tmp_path / "exports.json").read_text())
    assert list((tmp_path / "validation").glob("step-*.png"))  # validation sampled through the quantized base
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses)).all()
    lora = Path(exports["diffusers"])
    pipe, spec = text_to_image.load(str(tiny_model(family)), [str(lora)])  # the full-precision base
    assert any("lora_A" in name for name, _ in getattr(pipe, spec.denoiser).named_parameters())


def test_int8_weights_take_about_half_the_bytes_of_bf16() -> None:
    from diffbase.models.loading import load_pipeline

    pipe, _ = load_pipeline(TOY_FLUX, dtype="bfloat16")
    base = module_bytes(pipe.transformer)
    ratios = {}
    for kind in ("int8", "qint8", "fp8"):
        module = quantize(copy.deepcopy(pipe.transformer), kind, torch.bfloat16)
        ratios[kind] = module_bytes(module) / base
    assert 0.45 < ratios["int8"] < 0.6 and 0.45 < ratios["qint8"] < 0.6, ratios  # measured 0.52, 0.51
    assert ratios["fp8"] < 0.7, ratios  # norms, embeddings and in/out projections stay bf16 (measured 0.63)


def test_generate_runs_on_a_quantized_denoiser(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    outs = {}
    for kind in ("none", "int8", "int8dq"):
        out = tmp_path / f"{kind}.png"
        code, _, err = run_cli("generate", "--model", str(TOY_FLUX), "--prompt", "a person in a red shirt", "--size",
                               "32x32", "--steps", "4", "--quantize", kind, "--out", str(out), "--quiet")  # fmt: skip
        assert code == 0, err
        outs[kind] = np.asarray(Image.open(out), dtype=np.float64)
    for kind in ("int8", "int8dq"):  # measured: int8 54.0 dB, int8dq 51.8 dB
        mse = ((outs["none"] - outs[kind]) ** 2).mean()
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35, kind  # close to the full-precision image, not noise


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("model.quantize=nf4",), "model.quantize: nf4 (bitsandbytes) runs on a CUDA GPU only"),
        (("model.quantize=int4",), "model.quantize.denoiser: expected one of none, fp8, int8, qint8, nf4, fp8dq, "
                                   "int8dq, got 'int4'"),
        (("model.quantize=fp8dq",), "model.quantize: fp8dq quantizes activations for generation and does not train"),
        (("model.quantize={t5: int8dq}",), "model.quantize.t5: int8dq quantizes activations for generation"),
        (("model.quantize={vae: int8}",), "model.quantize: unknown component 'vae'"),
        (("model.quantize=int8", "training.method=full_finetune"), "model.quantize: training.method full_finetune "
                                                                    "trains the base's own weights"),
    ],
)  # fmt: skip
def test_bad_quantize_settings_are_one_line(args, expected, tmp_path: Path) -> None:
    code, _, err = train_tiny(TINY / "flux1_lora.yaml", tmp_path, 1, *args)
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "exports.json").exists()


def test_each_component_takes_its_own_backend_and_the_text_cache_keys_it(tmp_path: Path) -> None:
    """The text encoders quantized too (T5 with its `wo` kept, CLIP with its embeddings kept), their prompt
    embeddings cached under the quantized encoders' identity (a full-precision run does not reuse them)."""
    table = "model.quantize={denoiser: int8, t5: qint8, clip_l: fp8}"
    cache = ["data.cache_latents=true", "data.cache_text=true", f"data.cache_dir={tmp_path / 'cache'}", "--quiet"]
    code, out, err = train_tiny(TINY / "flux1_lora.yaml", tmp_path / "q", 2, table, *cache)
    assert code == 0, err
    code, out, err = train_tiny(TINY / "flux1_lora.yaml", tmp_path / "full", 2, *cache)
    assert code == 0 and re.search(r"prompts: [1-9]\d* computed, 0 reused", out), (
        out
    )  # other encoders, other embeddings


def test_fp8dq_is_refused_on_a_cpu_before_loading(tmp_path: Path) -> None:
    code, _, err = run_cli("generate", "--model", str(TOY_FLUX), "--prompt", "x", "--device", "cpu", "--dtype",
                           "bfloat16", "--quantize", "fp8dq", "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --quantize: fp8dq (torchao float8 dynamic quantization) needs a CUDA GPU with "
                          "compute capability >= 8.9")  # fmt: skip
    assert not (tmp_path / "x.png").exists()


def test_fp8dq_needs_compute_capability_8_9() -> None:
    from diffbase.runtime import fp8_refusal

    for capability in ((8, 9), (9, 0), (10, 0), (12, 0)):  # Ada, Hopper, Blackwell
        assert fp8_refusal(capability) is None, capability
    for capability in ((7, 5), (8, 0), (8, 6), (8, 7)):  # Turing, A100, RTX 30xx, Orin
        refusal = fp8_refusal(capability)
        assert refusal and f"this GPU is {capability[0]}.{capability[1]}" in refusal, capability
    assert "needs a CUDA GPU with compute capability >= 8.9" in fp8_refusal(None)


def test_fp8dq_takes_bfloat16_weights_only() -> None:
    from diffbase.errors import UserError

    with pytest.raises(UserError, match="fp8dq scales bfloat16 weights"):
        quantize(torch.nn.Linear(32, 32), "fp8dq", torch.float32)


def test_fp8dq_stores_every_linear_weight_in_float8(monkeypatch) -> None:
    """torchao builds the float8 weights only where a GPU of capability >= 8.9 is present; its check is skipped
    here to see what it stores (no float8 matmul runs): every Linear of the toy FLUX.1 transformer, about half
    the bytes of bf16."""
    import torchao.quantization.quant_api as quant_api

    from diffbase.models.loading import load_pipeline

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    pipe, _ = load_pipeline(TOY_FLUX, dtype="bfloat16")
    base = module_bytes(pipe.transformer)
    module = quantize(pipe.transformer, "fp8dq", torch.bfloat16)
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight.data).__name__ == "Float8Tensor" for m in linears)
    assert all(m.weight.data.qdata.dtype == torch.float8_e4m3fn for m in linears)
    assert 0.45 < module_bytes(module) / base < 0.6  # measured 0.52
