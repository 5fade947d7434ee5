"""DreamFit's cost: generation against plain FLUX.1 on the shipped toy, and where training memory goes.

- DreamFit generation (one write pass, then every step reads the banks) over plain generation with
  the same steps, model and size (goal <= 1.3 at 28 steps), median of interleaved runs;
- a read-pass step with the bank queries dropped over one that keeps them (the official path);
- the banks' memory (keys and values of every block);
- a training memory breakdown (weights, LoRAs with gradients and AdamW state, activations of the write
  and read passes with and without gradient checkpointing, banks), computed on the meta device, so it
  costs no memory: for the toy FLUX.1 at several sizes (how it scales with image tokens) and for
  FLUX.1-dev at 1024x768 in try-on mode.

python benchmarks/dreamfit.py [--steps 28] [--repeats 5] [--memory-only]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, LoraPair, diffusers_name, random_official
from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings, dreamfit_generate, reference_image
from diffbase.methods.dreamfit.mechanism.passes import install, write_banks
from diffbase.models.loading import load_pipeline

TOY = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
GIB = 2**30


class FlashLike(torch.autograd.Function):
    """Attention as the flash and memory-efficient kernels keep it for the backward pass: q, k, v, the
    output and the fp32 row log-sum-exp, never the attention matrix (on the meta device PyTorch would
    take the math path, which keeps the whole matrix). Shapes only: the breakdown runs on meta tensors."""

    @staticmethod
    def forward(ctx, q, k, v):  # (batch, tokens, heads, head_dim), as diffusers' dispatch takes them
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def flash_like(q, k, v, attn_mask=None, **_):
    return FlashLike.apply(q, k, v)


def memory_breakdown(
    model_config: Path, hw: tuple[int, int], rank: int = 16, mode: str = "tryon", text_tokens: int = 512,
    checkpointing: tuple[str, ...] = (), dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:  # fmt: skip
    """Bytes per part of one DreamFit training step (batch 1) on a FLUX.1 transformer built on the meta
    device: weights, what trains (fp32 LoRAs, their gradients, AdamW's two moments), the activations each
    pass keeps for the backward pass, and the banks. The text encoders and the VAE encoder are counted
    apart: DreamFit's cache frees them. `checkpointing`: the passes checkpointed."""
    from unittest import mock

    from diffusers import FluxTransformer2DModel

    from diffbase.config import load_config
    from diffbase.info import component_counts
    from diffbase.methods.dreamfit.mechanism.loras import DreamFitLoras
    from diffbase.methods.dreamfit.mechanism.passes import bank_checkpointing
    from diffbase.training.memory import SavedBytes

    cfg = load_config(model_config).model
    with torch.device("meta"):
        t = FluxTransformer2DModel(**cfg.transformer).to(dtype).requires_grad_(False)
        loras = DreamFitLoras(Dims.of(t), rank, seed=0, device="meta")
    state = install(t, loras.pairs())
    counts = component_counts(model_config)
    size = torch.finfo(dtype).bits // 8
    lora_bytes = sum(p.numel() for p in loras.parameters()) * 4
    h, w = hw[0] // 16, hw[1] // 16  # packed tokens: 8x VAE, then 2x2 patches
    ref_w = w * (1 if mode == "garment" else 2)  # pose and try-on put [first | garment] side by side

    def inputs(rows: int, cols: int) -> dict:
        ids = torch.zeros(rows * cols, 3, device="meta")
        return {
            "hidden_states": torch.empty(1, rows * cols, t.config.in_channels, device="meta", dtype=dtype),
            "encoder_hidden_states": torch.empty(1, text_tokens, t.config.joint_attention_dim, device="meta", dtype=dtype),
            "pooled_projections": torch.empty(1, t.config.pooled_projection_dim, device="meta", dtype=dtype),
            "timestep": torch.zeros(1, device="meta"),
            "guidance": torch.zeros(1, device="meta") if t.config.guidance_embeds else None,
            "img_ids": ids,
            "txt_ids": torch.zeros(text_tokens, 3, device="meta"),
            "return_dict": False,
        }  # fmt: skip

    params = list(t.parameters()) + list(loras.parameters())
    passes = {}
    with mock.patch("diffusers.models.attention_dispatch.dispatch_attention_fn", flash_like):
        for name, mode_, (rows, cols) in (("write", "write", (h, ref_w)), ("read", "read", (h, w))):
            meter = SavedBytes(exclude=params)
            if checkpointing:
                inner = bank_checkpointing(state, checkpointing)

                def counted(module, *args, inner=inner, meter=meter):
                    for a in args:  # a checkpointed block keeps its inputs alive for the recompute
                        if torch.is_tensor(a):
                            meter.add(a)
                    return inner(module, *args)

                t.enable_gradient_checkpointing(counted)
            if name == "write":
                state.clear()
            state.mode = mode_
            with meter:
                out = t(**inputs(rows, cols))[0]
            passes[name] = meter.total + (out.numel() * out.element_size() if name == "read" else 0)
    banks = state.bank_bytes()
    state.clear()
    return {
        "transformer weights": sum(p.numel() for p in t.parameters()) * size,
        "text encoders (freed by the cache)": sum(v for k, v in counts.items() if k.startswith("text_encoder")) * size,
        "VAE (encoder freed by the cache)": counts.get("vae", 0) * size,
        "DreamFit LoRAs (fp32)": lora_bytes,
        "LoRA gradients (fp32)": lora_bytes,
        "AdamW moments (fp32)": 2 * lora_bytes,
        "activations: write pass": passes["write"],
        "activations: read pass": passes["read"],
        # without write checkpointing the banks are views of the write pass's saved keys and values;
        # with it they are tensors of their own, alive until the read pass has run
        "banks held apart from the activations": banks if "write" in checkpointing else 0,
        "banks (all keys and values, for reference)": banks,
    }


def training_total(parts: dict[str, int], cached: bool = True) -> int:
    """What sits on the GPU during a step: with the cache, the text encoders and VAE are gone."""
    skip = ("freed by the cache", "for reference") if cached else ("for reference",)
    return sum(v for k, v in parts.items() if not any(s in k for s in skip))


def memory_table() -> str:
    """The breakdown for the toy at three sizes and FLUX.1-dev at 1024x768 (bf16, rank 16, try-on)."""
    rows = [("toy FLUX.1", CONFIGS / "flux1_toy.yaml", hw, 32) for hw in ((32, 32), (64, 64), (128, 128))]
    rows.append(("FLUX.1-dev", CONFIGS / "flux1_dev.yaml", (1024, 768), 512))
    lines = []
    for label, config, hw, text in rows:
        columns = [
            memory_breakdown(config, hw, text_tokens=text, checkpointing=c) for c in ((), ("write",), ("write", "read"))
        ]
        unit, name = (GIB, "GiB") if label == "FLUX.1-dev" else (2**20, "MiB")
        lines.append(f"\n{label}, {hw[0]}x{hw[1]} try-on, rank 16, bf16, batch 1 ({name}):\n")
        lines.append(
            "| part | no checkpointing | write pass checkpointed | both passes checkpointed |\n|---|---|---|---|"
        )
        for key in columns[0]:
            lines.append(f"| {key} | " + " | ".join(f"{c[key] / unit:.2f}" for c in columns) + " |")
        for cached in (True, False):
            what = "step total, cached" if cached else "step total, uncached (encoders on the GPU)"
            lines.append(
                f"| **{what}** | " + " | ".join(f"{training_total(c, cached) / unit:.2f}" for c in columns) + " |"
            )
    return "\n".join(lines)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(steps: int = 28, repeats: int = 5, size: int = 32) -> None:
    pipe, _ = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    pairs = {}
    for key, (down, up) in random_official(Dims.of(t), rank=16).items():
        kind, index, name = key.split("_blocks.")[0], int(key.split(".")[1]), key.split(".", 2)[2]
        pairs[diffusers_name(kind, index, name)] = LoraPair(down, up, 1.0)
    prompt = "a person wearing a striped red t-shirt"
    settings = DreamFitSettings(prompt=prompt, steps=steps, guidance=4.0, height=size, width=size)
    garment = Image.new("RGB", (size, size), (200, 40, 40))
    reference = reference_image("garment", garment, (size, size))

    def plain() -> None:
        state.mode = "off"
        pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=32,
        )

    def dreamfit() -> None:
        dreamfit_generate(pipe, state, settings, reference)

    state = install(t, pairs)
    plain(), dreamfit()  # warm-up
    ratios = [timed(dreamfit) / timed(plain) for _ in range(repeats)]

    # one read step with and without the bank queries, and the bank's size
    g = torch.Generator().manual_seed(0)
    tokens, text = (size // 4) ** 2, 32
    ids = torch.stack(torch.meshgrid(torch.arange(size // 4), torch.arange(size // 4), indexing="ij"), -1).reshape(
        -1, 2
    )
    x = {
        "hidden_states": torch.randn(1, tokens, t.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, t.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([4.0]),
        "img_ids": torch.cat([torch.zeros(tokens, 1), ids.float()], 1),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    step_ratios = []
    with torch.no_grad():
        for _ in range(repeats):
            state.keep_bank_queries = False
            write_banks(t, state, **x)
            bank = state.bank_bytes()
            fast = min(timed(lambda: t(**x)) for _ in range(5))
            state.keep_bank_queries = True
            write_banks(t, state, **x)
            slow = min(timed(lambda: t(**x)) for _ in range(5))
            step_ratios.append(fast / slow)
    state.clear()
    print("| measure | value |\n|---|---|")
    print(
        f"| DreamFit generation over plain FLUX.1 (toy, {size}x{size}, {steps} steps), median of {repeats} | "
        f"{statistics.median(ratios):.3f} (goal <= 1.3) |"
    )
    print(
        f"| read-pass step, bank queries dropped over kept, median of {repeats} | {statistics.median(step_ratios):.3f} |"
    )
    print(
        f"| bank memory (keys and values, every block, {tokens} image + {text} text tokens) | {bank / 1024:.1f} KiB |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-only", action="store_true", help="only the training memory breakdown")
    args = parser.parse_args()
    if not args.memory_only:
        main(args.steps, args.repeats)
    print(memory_table())
