"""Loading DreamFit's official checkpoints onto a diffusers FLUX.1 transformer (the loading part of
the DreamFit issue; the write and read passes are not built yet)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffbase.errors import UserError
from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, load_dreamfit, random_official, save_official
from diffbase.models.loading import load_pipeline


def tiny_transformer(tiny_model):
    pipe, _ = load_pipeline(tiny_model("flux1"))
    return pipe.transformer


def test_an_official_layout_checkpoint_loads_with_every_key_used(tiny_model, tmp_path: Path) -> None:
    transformer = tiny_transformer(tiny_model)
    dims = Dims.of(transformer)
    pairs = random_official(dims, rank=4)
    path = save_official(pairs, tmp_path / "flux_tryon.bin")
    loaded = load_dreamfit(path, transformer)
    assert len(loaded) == len(pairs) == 8 * dims.double + 5 * dims.single
    q = loaded["transformer_blocks.0.processor.ref_qkv_lora_q"]
    assert q.rank == 4 and q.scale == pytest.approx(16 / 4)  # alpha / rank, lora_weight 1
    proj = loaded[f"single_transformer_blocks.{dims.single - 1}.processor.ref_proj_lora"]
    assert proj.rank == 8 and proj.scale == pytest.approx(32 / 8) and proj.down.shape[1] == dims.hidden + dims.mlp
    down, up = pairs["double_blocks.0.img_mlp_lora_1"]
    x = torch.randn(3, dims.hidden)
    assert torch.allclose(loaded["transformer_blocks.0.img_mlp_lora_1"].delta(x), x @ down.T @ up.T * 4, atol=1e-6)


def test_lora_weight_is_squared_officially_and_only_on_processor_loras(tiny_model, tmp_path: Path) -> None:
    transformer = tiny_transformer(tiny_model)
    path = save_official(random_official(Dims.of(transformer), rank=4), tmp_path / "c.bin")
    official = load_dreamfit(path, transformer, lora_weight=0.5)
    linear = load_dreamfit(path, transformer, lora_weight=0.5, lora_weight_mode="linear")
    name = "transformer_blocks.0.processor.ref_qkv_lora_k"
    assert official[name].scale == pytest.approx(4 * 0.25) and linear[name].scale == pytest.approx(4 * 0.5)
    assert official["transformer_blocks.0.img_mod.lin_lora"].scale == pytest.approx(4.0)


def test_wrong_checkpoints_say_what_is_wrong(tiny_model, tmp_path: Path) -> None:
    transformer = tiny_transformer(tiny_model)
    dims = Dims.of(transformer)
    pairs = random_official(dims, rank=4)
    incomplete = {k: v for k, v in pairs.items() if k != "single_blocks.1.processor.ref_qkv_lora_v"}
    with pytest.raises(UserError, match=r"missing single_blocks.1.processor.ref_qkv_lora_v.\{down,up\}.weight"):
        load_dreamfit(save_official(incomplete, tmp_path / "a.bin"), transformer)
    wider = random_official(Dims(dims.hidden * 2, dims.mlp * 2, dims.double, dims.single), rank=4)
    with pytest.raises(
        UserError, match=r"double_blocks.0.img_mlp_lora_1: down \(4, 64\) and up \(256, 4\), expected \(rank, 32\)"
    ):
        load_dreamfit(save_official(wider, tmp_path / "b.bin"), transformer)
    deeper = random_official(Dims(dims.hidden, dims.mlp, dims.double + 1, dims.single), rank=4)
    with pytest.raises(UserError, match=r"unused double_blocks.1.img_mlp_lora_1.\*"):
        load_dreamfit(save_official(deeper, tmp_path / "c.bin"), transformer)
    (tmp_path / "d.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable DreamFit checkpoint"):
        load_dreamfit(tmp_path / "d.bin", transformer)
