"""DreamFit checkpoints that cover only some blocks (issue 29, item 3). The official loader installs its
LoRA processors on the chosen blocks only and leaves the others with the block's default processor: plain
FLUX in every mode, so no LoRA there and no bank written or read. A block without weights is therefore
not the same as a block with zero LoRAs (that one still banks its keys and values)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from diffbase.errors import UserError
from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, load_dreamfit, random_official, save_official
from diffbase.methods.dreamfit.mechanism.passes import BankState, DreamFitProcessor, install
from diffbase.models.loading import load_pipeline
from tests.helpers import transformer_inputs

SUBSETS = {  # BFL blocks the checkpoint covers; the tiny FLUX.1 has 1 double and 2 single blocks
    "single0": ("single_blocks.0",),
    "double0-single1": ("double_blocks.0", "single_blocks.1"),
}
DIFFUSERS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def diffusers_block(block: str) -> str:
    kind, index = block.rsplit(".", 1)
    return f"{DIFFUSERS[kind]}.{index}"


def in_blocks(key: str, blocks: tuple[str, ...]) -> bool:
    return any(key.startswith(b + ".") for b in blocks)


def full_pairs(transformer: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Official-layout pairs large enough to change the output visibly."""
    return {k: (d, u * 20) for k, (d, u) in random_official(Dims.of(transformer), rank=4, seed=5).items()}


def write_then_read(
    transformer: Any, state: BankState, drop: frozenset[str] | set[str] = frozenset()
) -> tuple[torch.Tensor, ...]:
    """The write pass's output on the garment and the read pass's on the target (banks in `drop` removed
    before reading)."""
    with torch.no_grad():
        state.mode = "write"
        written = transformer(**transformer_inputs(transformer, 1))[0]
        for name in drop:
            del state.banks[name]
        state.mode = "read"
        read = transformer(**transformer_inputs(transformer, 0))[0]
    return written, read


@pytest.fixture(scope="module")
def stock(tiny_model) -> Any:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    return pipe.transformer


@pytest.mark.parametrize("subset", SUBSETS)
def test_processors_and_hooks_go_only_where_weights_exist(stock, tmp_path: Path, subset: str) -> None:
    covered = SUBSETS[subset]
    t = copy.deepcopy(stock)
    before = dict(t.attn_processors)
    partial = {k: v for k, v in full_pairs(t).items() if in_blocks(k, covered)}
    pairs = load_dreamfit(save_official(partial, tmp_path / "partial.bin"), t)
    assert len(pairs) == len(partial)
    state = install(t, pairs)
    wanted = {diffusers_block(b) for b in covered}
    for name, processor in t.attn_processors.items():
        block = name.rsplit(".attn.processor", 1)[0]
        if block in wanted:
            assert isinstance(processor, DreamFitProcessor) and processor.name == block
        else:
            assert processor is before[name]  # the original (default) processor, untouched
            assert all(not m._forward_hooks for m in t.get_submodule(block).modules())  # no LoRA hook either
    write_then_read(t, state)
    assert set(state.banks) == wanted and state.writes == len(wanted)


@pytest.mark.parametrize("subset", SUBSETS)
def test_a_partial_checkpoint_computes_what_absent_blocks_compute(stock, tmp_path: Path, subset: str) -> None:
    """Partial checkpoint == full checkpoint whose other blocks have zero LoRAs *and* no bank: plain FLUX."""
    covered = SUBSETS[subset]
    full = full_pairs(stock)
    partial = {k: v for k, v in full.items() if in_blocks(k, covered)}
    zeroed = {k: (v if in_blocks(k, covered) else (v[0], torch.zeros_like(v[1]))) for k, v in full.items()}
    ours, reference, banked = (copy.deepcopy(stock) for _ in range(3))
    state = install(ours, load_dreamfit(save_official(partial, tmp_path / "partial.bin"), ours))
    ref_state = install(reference, load_dreamfit(save_official(zeroed, tmp_path / "zeroed.bin"), reference))
    banked_state = install(banked, load_dreamfit(tmp_path / "zeroed.bin", banked))
    uncovered = {n.rsplit(".attn.processor", 1)[0] for n in reference.attn_processors}
    uncovered -= {diffusers_block(b) for b in covered}
    written, read = write_then_read(ours, state)
    ref_written, ref_read = write_then_read(reference, ref_state, drop=uncovered)
    assert (written - ref_written).abs().max() <= 1e-5 and (read - ref_read).abs().max() <= 1e-5
    for name, (_, k, v) in state.banks.items():
        assert torch.allclose(k, ref_state.banks[name][1], atol=1e-6) and torch.allclose(v, ref_state.banks[name][2])
    _, banked_read = write_then_read(banked, banked_state)  # zero LoRAs but banks kept: not the official meaning
    assert (read - banked_read).abs().max() > 1e-4
    with torch.no_grad():
        state.mode = "off"
        plain = ours(**transformer_inputs(ours, 0))[0]
    assert (read - plain).abs().max() > 1e-4  # the covered blocks still act


def test_a_partial_checkpoint_generates_from_the_cli(tiny_model, tmp_path: Path) -> None:
    from PIL import Image

    from tests.helpers import run_cli

    pipe, _ = load_pipeline(tiny_model("flux1"))
    partial = {k: v for k, v in full_pairs(pipe.transformer).items() if in_blocks(k, SUBSETS["single0"])}
    ckpt = save_official(partial, tmp_path / "partial.bin")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "g.png")
    code, _, err = run_cli("dreamfit", "--model", str(tiny_model("flux1")), "--checkpoint", str(ckpt), "--garment",
                           str(tmp_path / "g.png"), "--prompt", "a person", "--size", "32x32", "--steps", "2",
                           "--out", str(tmp_path / "out.png"))  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_partial_checkpoints_that_do_not_fit_are_one_line_errors_naming_the_file(stock, tmp_path: Path) -> None:
    dims = Dims.of(stock)
    full = full_pairs(stock)
    deeper = random_official(Dims(dims.hidden, dims.mlp, dims.double, dims.single + 1), rank=4)
    wider = random_official(Dims(dims.hidden * 2, dims.mlp * 2, dims.double, dims.single), rank=4)
    cases = {
        "extra-block.bin": (
            {k: v for k, v in deeper.items() if in_blocks(k, ("single_blocks.0", f"single_blocks.{dims.single}"))},
            rf"unused single_blocks\.{dims.single}\.modulation\.lin_lora\.\* and 4 more",
        ),
        "only-extra.bin": (
            {k: v for k, v in deeper.items() if in_blocks(k, (f"single_blocks.{dims.single}",))},
            rf"unused single_blocks\.{dims.single}\.",
        ),
        "wrong-shape.bin": (
            {k: v for k, v in wider.items() if in_blocks(k, ("single_blocks.1",))},
            r"single_blocks\.1\.modulation\.lin_lora: down \(4, 64\) and up \(192, 4\), expected \(rank, 32\)",
        ),
        "half-a-block.bin": (
            {k: v for k, v in full.items() if in_blocks(k, ("double_blocks.0",)) and "lora_k" not in k},
            r"missing double_blocks\.0\.processor\.ref_qkv_lora_k\.\{down,up\}\.weight$",
        ),
        "empty.bin": ({}, r"no DreamFit LoRA pairs$"),
    }
    for file, (pairs, message) in cases.items():
        path = save_official(pairs, tmp_path / file)
        with pytest.raises(UserError, match=message) as err:
            load_dreamfit(path, stock)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
