"""Block swap for training (`hardware.offload: blocks`). A swapped-out weight holds an empty placeholder, so on
this CPU (where "the GPU" and the CPU store are the same memory) any computation that used a weight while it
was away would fail: the same gradients as without swapping show that every block's weights were back in time,
in the forward pass and in the recompute of the backward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from diffbase.errors import UserError
from diffbase.methods.lora import LoraConfig, add_lora
from diffbase.models.block_swap import attach_block_swap, transformer_blocks
from tests.helpers import SHAPES, run_cli


def flux_with_lora(tiny_model) -> torch.nn.Module:
    """The tiny FLUX.1 transformer with 2 double and 4 single blocks (enough for some to be parked mid-pass)."""
    from diffusers import FluxTransformer2DModel

    from diffbase.models.loading import load_pipeline

    config = dict(load_pipeline(tiny_model("flux1"))[0].transformer.config)
    torch.manual_seed(0)
    t = FluxTransformer2DModel.from_config({**config, "num_layers": 2, "num_single_layers": 4})
    t.requires_grad_(False)
    add_lora(t, "flux1", LoraConfig(rank=2, alpha=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give it values so every LoRA gets a gradient
        for name, p in t.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return t


def step(t: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    c = t.config
    g = torch.Generator().manual_seed(1)
    img, txt = 16, 4
    out = t(
        hidden_states=torch.randn(1, img, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(img, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )[0]
    loss = out.square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in t.named_parameters() if p.requires_grad}


def test_swapped_blocks_give_the_same_loss_and_gradients(tiny_model) -> None:
    plain = flux_with_lora(tiny_model)
    swapped = copy.deepcopy(plain)
    plain.enable_gradient_checkpointing()
    swapped.enable_gradient_checkpointing()
    swap = attach_block_swap(swapped, "cpu", keep=1)
    blocks = transformer_blocks(swapped)
    assert len(blocks) == 6 and sorted(swap.stored) == [1, 2, 3, 4, 5]
    frozen = blocks[1].attn.to_q.base_layer.weight
    assert frozen.numel() == 0 and not frozen.requires_grad  # away: an empty placeholder
    assert blocks[1].attn.to_q.lora_A["default"].weight.numel() > 0  # what trains never moves
    loss, grads = step(plain)
    loss_s, grads_s = step(swapped)
    assert loss_s == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_s.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_s[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert swap.fetches >= 2 * len(swap.stored) - 2  # in the forward, and again for the recompute
    assert len(swap.resident) <= 3  # the block running and its neighbours
    swap.remove()
    assert frozen.numel() > 0


def test_without_checkpointing_a_swapped_weight_is_missed_loudly(tiny_model) -> None:
    """Autograd would keep the weights of every block for the backward pass: the placeholder makes that an
    error, never a silent use of a stale or missing weight (and training refuses this setting beforehand)."""
    t = flux_with_lora(tiny_model)
    attach_block_swap(t, "cpu", keep=0)
    with pytest.raises(RuntimeError):
        step(t)


def test_nothing_frozen_to_swap_and_bad_keep_counts_are_refused(tiny_model) -> None:
    t = flux_with_lora(tiny_model)
    with pytest.raises(UserError, match="hardware.keep_blocks: expected 0 to 5"):
        attach_block_swap(t, "cpu", keep=6)
    t.requires_grad_(True)
    with pytest.raises(UserError, match="every block weight trains here"):
        attach_block_swap(t, "cpu", keep=0)


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_a_lora_run_with_block_swap_trains_validates_exports_as_without(family, tmp_path) -> None:
    import json

    losses = {}
    for offload in ("none", "blocks"):
        out = tmp_path / offload
        code, _, err = run_cli(
            "train", f"configs/experiments/tiny/{family}_lora.yaml", "training.max_steps=3",
            "training.checkpoint_every=0", "training.validation.steps=2", f"data.train_path={SHAPES}",
            f"experiment.output_dir={out}", f"hardware.offload={offload}", "hardware.gradient_checkpointing=true",
        )  # fmt: skip
        assert code == 0, err
        assert (out / "lora" / "lora_kohya.safetensors").exists() and list((out / "validation").glob("*.png"))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[offload] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["none"]) == 3
    assert losses["blocks"] == pytest.approx(losses["none"], rel=1e-5)


def test_block_swap_and_ema_in_bf16_as_users_run_them(tmp_path) -> None:
    code, _, err = run_cli(
        "train", "configs/experiments/tiny/flux1_lora.yaml", "training.max_steps=2", "training.checkpoint_every=0",
        "training.validation.steps=2", f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}",
        "hardware.offload=blocks", "hardware.gradient_checkpointing=true", "training.ema.enabled=true",
        "--dtype", "bfloat16",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "validation" / "step-000002.png").exists() and (
        tmp_path / "lora" / "lora_kohya.safetensors"
    ).exists()


def test_a_unet_is_refused_before_loading(tmp_path) -> None:
    code, _, err = run_cli(
        "train", "configs/experiments/tiny/sdxl_lora.yaml", "training.max_steps=1", f"data.train_path={SHAPES}",
        f"experiment.output_dir={tmp_path / 'r'}", "hardware.offload=blocks", "hardware.gradient_checkpointing=true",
    )  # fmt: skip
    assert code == 2 and "hardware.offload: blocks swaps transformer blocks (FLUX.1, FLUX.2, SD3)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_block_swap_without_checkpointing_is_refused_before_loading(tmp_path) -> None:
    code, _, err = run_cli(
        "train", "configs/experiments/tiny/flux1_lora.yaml", f"data.train_path={SHAPES}",
        f"experiment.output_dir={tmp_path / 'r'}", "hardware.offload=blocks", "hardware.gradient_checkpointing=false",
    )  # fmt: skip
    assert code == 2 and err.strip().splitlines() == [
        "error: hardware.gradient_checkpointing: offload blocks brings each block back for its recompute in the "
        "backward pass; set it true (or auto)"
    ]
    assert not (tmp_path / "r").exists()
