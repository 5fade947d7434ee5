"""Single-file checkpoints: FLUX.1 in BFL and ComfyUI layouts give the folder's pixels; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffbase.models.bfl_flux import COMFY_PREFIX, bfl_to_diffusers, diffusers_to_bfl
from diffbase.models.loading import load_pipeline
from tests.golden_record import assert_pixels_close
from tests.helpers import run_cli

ARGS = ["--prompt", "a photo of a cat", "--steps", "2", "--size", "64x64", "--seed", "3", "--guidance", "3.5"]


def generate(tmp_path: Path, name: str, *model_args: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    code, _, err = run_cli("generate", *model_args, *ARGS, "--out", str(out))
    assert code == 0, err
    return np.asarray(Image.open(out))


@pytest.fixture(scope="module")
def flux_state(tiny_model) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tiny_model("flux1")
    pipe, _ = load_pipeline(folder)
    return folder, pipe.transformer.state_dict()


def test_round_trip_is_exact(flux_state) -> None:
    _, state = flux_state
    bfl = diffusers_to_bfl(state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert "final_layer.adaLN_modulation.1.weight" in bfl
    back = bfl_to_diffusers(bfl)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX], ids=["bfl", "comfyui"])
def test_bfl_file_gives_the_folder_pixels(prefix: str, flux_state, tmp_path: Path) -> None:
    folder, state = flux_state
    file = tmp_path / "flux1.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in diffusers_to_bfl(state).items()}, str(file))
    from_file = generate(tmp_path, "file", "--model", str(file), "--config", str(folder))
    from_folder = generate(tmp_path, "folder", "--model", str(folder))
    assert_pixels_close(from_file, from_folder)


def test_changed_weights_in_the_file_change_the_image(flux_state, tmp_path: Path) -> None:
    folder, state = flux_state
    bfl = diffusers_to_bfl(state)
    bfl["img_in.weight"] = bfl["img_in.weight"] * 2
    file = tmp_path / "changed.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(file))
    assert not np.array_equal(
        generate(tmp_path, "a", "--model", str(file), "--config", str(folder)),
        generate(tmp_path, "b", "--model", str(folder)),
    )


def error_of(*argv: str) -> str:
    code, _, err = run_cli("generate", *argv, *ARGS, "--out", "/tmp/never-written.png")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_single_file_errors(flux_state, tiny_model, tmp_path: Path) -> None:
    folder, state = flux_state
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(state).items()}
    missing = tmp_path / "nope.safetensors"
    assert "model path not found" in error_of("--model", str(missing), "--config", str(folder))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert f"{garbage}: not a readable checkpoint" in error_of("--model", str(garbage), "--config", str(folder))

    no_config = tmp_path / "ok.safetensors"
    save_file(bfl, str(no_config))
    assert "needs --config" in error_of("--model", str(no_config))

    wrong_family = error_of("--model", str(no_config), "--config", str(tiny_model("sd15")))
    assert "found a flux1 checkpoint, expected sd15" in wrong_family

    sd_unet = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd_unet))
    assert "found a sd15 checkpoint, expected flux1" in error_of("--model", str(sd_unet), "--config", str(folder))

    shaped = dict(bfl)
    shaped["img_in.weight"] = torch.zeros(7, 7)
    bad_shape = tmp_path / "shape.safetensors"
    save_file(shaped, str(bad_shape))
    err = error_of("--model", str(bad_shape), "--config", str(folder))
    assert "key x_embedder.weight has shape (7, 7), the config folder expects (32, 64)" in err

    partial = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.1.")}
    missing_keys = tmp_path / "partial.safetensors"
    save_file(partial, str(missing_keys))
    err = error_of("--model", str(missing_keys), "--config", str(folder))
    assert "missing (e.g. single_transformer_blocks.1." in err


def test_pickle_checkpoints_load_with_weights_only(flux_state, tmp_path: Path) -> None:
    folder, state = flux_state
    file = tmp_path / "flux1.pt"
    torch.save(diffusers_to_bfl(state), file)
    assert_pixels_close(
        generate(tmp_path, "pt", "--model", str(file), "--config", str(folder)),
        generate(tmp_path, "dir", "--model", str(folder)),
    )


def test_a_diffusers_layout_transformer_file_loads_and_other_parts_are_explained(
    flux_state, tiny_model, tmp_path
) -> None:
    """A FLUX.1 transformer saved in diffusers' own key layout is a FLUX.1 file (it was once taken for
    SD3: both have ff_context); a UNet's diffusers-layout file is a folder's part, and says so."""
    folder, state = flux_state
    single = tmp_path / "flux1-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    via_file = generate(tmp_path, "file", "--model", str(single), "--config", str(folder))
    assert (via_file == generate(tmp_path, "folder", "--model", str(folder))).all()
    unet = load_pipeline(tiny_model("sd15"))[0].unet.state_dict()
    part = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.items()}, str(part))
    err = error_of("--model", str(part), "--config", str(tiny_model("sd15")))
    assert "diffusers-layout weights of one component" in err and "pass the folder as --model" in err


def write_gguf(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A GGUF file as ComfyUI users hold them: Q8_0 blocks for the matrices whose rows split into 32-value blocks,
    float16 / float32 for the rest."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in state.items():
        a = tensor.float().numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, a.astype(np.float16) if a.ndim > 1 else a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_flux1_file_loads_quantized_and_draws_close_to_the_folder(flux_state, tmp_path: Path) -> None:
    """Its matrices stay Q8_0 (diffusers' GGUFLinear dequantizes per call); the image is close to the folder's:
    Q8_0 keeps about 8 bits per weight (PSNR measured 56.8 dB on the tiny model under avx512 and default
    kernels; 28 dB is the bar)."""
    pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'diffbase[quantize]')")
    from diffbase.models.single_file import load_single_file_pipeline

    folder, state = flux_state
    file = write_gguf(tmp_path / "flux1-tiny-Q8_0.gguf", diffusers_to_bfl(state))
    pipe, _ = load_single_file_pipeline(file, folder)
    kinds = {type(m).__name__ for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"GGUFLinear"}, kinds
    a = generate(tmp_path, "folder", "--model", str(folder)).astype(np.float64)
    b = generate(tmp_path, "gguf", "--model", str(file), "--config", str(folder)).astype(np.float64)
    assert 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-9)) > 28


def test_a_gguf_file_of_another_family_is_one_line(flux_state, tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'diffbase[quantize]')")
    folder, state = flux_state
    sdxl = write_gguf(tmp_path / "sdxl.gguf", {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 32),
                                               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(32)})  # fmt: skip
    code, _, err = run_cli(
        "generate", "--model", str(sdxl), "--config", str(folder), *ARGS, "--out", str(tmp_path / "x.png")
    )
    assert code == 2 and "found a sdxl checkpoint, expected flux1" in err and err.count("\n") == 1, err
    flux = write_gguf(tmp_path / "flux.gguf", diffusers_to_bfl(state))
    code, _, err = run_cli("generate", "--model", str(flux), "--config", str(tiny_model("sd15")), *ARGS[:-2],
                           "--out", str(tmp_path / "y.png"))  # fmt: skip
    assert code == 2 and "found a flux1 checkpoint, expected sd15" in err, err
