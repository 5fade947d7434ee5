"""DreamFit's write and read passes on a tiny FLUX.1 transformer."""

from __future__ import annotations

import copy

import torch

from diffbase.dreamfit.checkpoint import Dims, LoraPair, diffusers_name, random_official
from diffbase.dreamfit.mechanism import install, write_banks
from diffbase.models.loading import load_pipeline


def inputs(transformer, seed: int, tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    side = int(tokens**0.5)
    img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return {
        "hidden_states": torch.randn(1, tokens, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.cat([torch.zeros(tokens, 1), img_ids.float()], dim=1),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def pairs_for(transformer, zero: bool = False) -> dict[str, LoraPair]:
    out = {}
    for key, (down, up) in random_official(Dims.of(transformer), rank=4, seed=1).items():
        kind, index, name = key.split("_blocks.")[0], int(key.split(".")[1]), key.split(".", 2)[2]
        out[diffusers_name(kind, index, name)] = LoraPair(down, up * (0 if zero else 20), 4.0)
    return out


def test_plain_mode_is_diffusers_and_zero_loras_write_the_plain_qkv(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    stock = copy.deepcopy(pipe.transformer)
    x = inputs(stock, 0)
    with torch.no_grad():
        expected = stock(**x)[0]
    plain, zero = copy.deepcopy(stock), copy.deepcopy(stock)
    state_plain, state_zero = install(plain), install(zero, pairs_for(zero, zero=True))
    with torch.no_grad():
        assert torch.equal(plain(**x)[0], expected)  # mode "off" is the stock processor's computation
    garment = inputs(stock, 1)
    write_banks(plain, state_plain, **garment)
    write_banks(zero, state_zero, **garment)
    assert set(state_plain.banks) == set(state_zero.banks) and len(state_plain.banks) == len(plain.attn_processors)
    for name, (q, k, v) in state_plain.banks.items():
        zq, zk, zv = state_zero.banks[name]
        assert torch.equal(q, zq) and torch.equal(k, zk) and torch.equal(v, zv)
    lora = copy.deepcopy(stock)
    state_lora = install(lora, pairs_for(lora))
    write_banks(lora, state_lora, **garment)
    assert all(not torch.equal(state_lora.banks[n][2], state_plain.banks[n][2]) for n in state_plain.banks)


def test_banks_are_written_once_and_read_every_step_dropping_bank_queries_exactly(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    t = pipe.transformer
    state = install(t, pairs_for(t))
    write_banks(t, state, **inputs(t, 1))
    blocks = len(t.attn_processors)
    assert state.writes == blocks
    double = next(iter(k for k in state.banks if k.startswith("transformer_blocks")))
    single = next(iter(k for k in state.banks if k.startswith("single_transformer_blocks")))
    assert state.banks[double][1].shape[1] == 16 and state.banks[single][1].shape[1] == 8 + 16  # image / text+image
    x = inputs(t, 0)
    with torch.no_grad():
        fast = [t(**x)[0] for _ in range(3)]
        state.keep_bank_queries = True
        slow = t(**x)[0]
        state.mode = "off"
        plain = t(**x)[0]
    assert state.writes == blocks  # reading never writes
    assert torch.equal(fast[0], fast[2])
    assert (fast[0] - slow).abs().max() <= 1e-5
    assert (fast[0] - plain).abs().max() > 1e-3  # the garment's banks change the result
