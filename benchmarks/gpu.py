"""diffbase against plain diffusers on one H100/H200, in one process, in under 8 minutes.

Full size, random weights built on the GPU (no downloads), bf16:

1. LoRA training, FLUX.1-dev, 1024x1024, batch 1, rank 16, through diffbase's own path
   (its own `train(config)`: data folder, cache, loop, validation image, export), cached and
   uncached, against a minimal diffusers + peft loop in this file (same model built the same way,
   same LoRA layers, bf16 autocast, AdamW, flow-matching loss on random latents and text embeddings
   of the right shapes, the same gradient checkpointing setting). s/step is the median of the step
   times after 2 warm-up steps; peak memory is torch's max_memory_allocated, reset where the training
   loop starts (and, as a second row, over the whole run); MFU is the FLOPs of one step of the plain
   loop (same model and shapes), counted by FlopCounterMode, over (s/step x the bf16 dense peak).
   The cached run then takes 3 more steps under torch.profiler: their chrome trace (train-trace.json.gz,
   beside --out, else in the work folder) and where their time goes (the top ops by self CUDA time per
   step, CPU time on a CPU; on CUDA, how often per step the host waited for the GPU) are rows of the table.
   FLUX.2 klein-4b LoRA through diffbase (cached). Last, if the time budget allows, FLUX.1 with
   `hardware.gradient_checkpointing=auto`.
2. `diffbase.generate.generate` against the bare FluxPipeline call, same pipe, 1024x1024, 28 steps.
3. DreamFit generation (random rank-32 DreamFit LoRAs) over plain FLUX.1, 1024x768, 28 steps.
4. CatVTON try-on (SD1.5-size UNet, 9 input channels) at 1024x768, 50 DDIM steps, guidance 2.5.
5. DreamFit training in try-on mode, FLUX.1-dev, 1024x768, rank 16, batch 1, through `train(config)`
   with DreamFit's cache, the write pass checkpointed (goal <= 60 GiB, <= 1.6 s/step).
6. FLUX.1 Kontext LoRA on paired edits (synthetic recolour pairs), 1024x1024, rank 16, batch 1, cached
   target and source latents: s/step and peak memory.
7. DreamO generation with 1 and 2 references (512 px) over plain FLUX.1, 1024x1024, 12 steps, exact and
   cached-reference modes, and the cached mode's error (goal: 1 reference exact <= 1.6x plain).
8. The tiled upscaler, 1024x1024 -> 2048x2048 (9 fused 1024 px tiles), 20 steps at strength 0.35, plain
   and with a DINOv2 ViT-B/14 and its adapter: s/image and peak memory.
9. Low memory (`lowmem`, if the time budget allows): FLUX.1-dev LoRA on an int8 and an fp8 base with gradient
   checkpointing, as `diffbase plan --gpu-memory 24` advises (goals: within 24 GiB at <= 1.5x the bf16 step time),
   on nf4 with block swap (goal: within 16 GiB), each beside `diffbase plan`'s predicted peak (goal: within 10%);
   generation on an int8 transformer (goal: within 12 GiB), also with model offload (goal: within 8 GiB).
10. fp8 (`--quantize fp8dq`, if the time budget allows): FLUX.1-dev generation, 1024x1024, 28 steps, the
   transformer's blocks compiled, bf16 against torchao float8 weights and activations: s/image over 4 prompts
   (seeds 0-3), peak memory, and each fp8 picture's PSNR against the bf16 one (random weights: how far fp8
   moves the numbers, not how a trained model's pictures look). Right after stage `compile` it starts from that
   stage's compiled pipeline (one build and one compile fewer on the GPU's clock). It needs CUDA compute capability >= 8.9;
   elsewhere int8dq stands in (labelled) and the fp8 rows say n/a.

Every stage reports its own error and the others still run; the exit code is 1 if any stage failed
(not for missed goals). On CUDA the SDPA kernels are diffbase's `auto` for every stage, plain runs
included: flash, memory-efficient and math, cuDNN off (its FLUX backward fails on H100/H200 with
torch >= 2.11, plain diffusers too; see diffbase/attention.py).

`--tiny` runs the same code with the tiny model configs at 32-64 px and 2-3 sampling steps, on a
CPU in well under a minute (tests/test_gpu_benchmark.py); its timings mean nothing.

python benchmarks/gpu.py [--out RESULTS.md] [--stages train,generate,...] [--budget-s 480]
python benchmarks/gpu.py --tiny [--device cpu|cuda] [--out r.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.interface.bench import (
    FULL,
    GIB,
    PROMPT,
    TINY,
    Context,
    Stage,
    bench_overrides,
    diffbase_train,
    flop_text,
    flux1_pipeline,
    free,
    gib,
    interleaved,
    mfu,
    peak_bytes,
    report_diffbase,
    report_profile,
    reset_peak,
    step_seconds,
    timed,
    train_config,
    verdict,
)  # fmt: skip


@dataclass(frozen=True)
class Own:
    """The sizes of this file's own stages (the trainers and generation); each method's are in its bench.py."""

    flux1_train: str
    klein_train: str
    gen_hw: tuple[int, int]
    gen_steps: int
    gen_repeats: int


OWN = {
    False: Own("experiments/flux1_dev_lora.yaml", "experiments/flux2_klein_4b_lora.yaml", (1024, 1024), 28, 2),
    True: Own("experiments/tiny/flux1_lora.yaml", "experiments/tiny/flux2_klein_lora.yaml", (64, 64), 3, 2),
}


def trained(ctx: Context, config: Config, **kwargs: Any) -> dict[str, Any]:
    """diffbase's `train(config)` for the config's method, measured."""
    from diffbase.methods import get

    return diffbase_train(ctx, config, get(config.training.method), **kwargs)


# --------------------------------------------------------------------------- training


def plain_lora(ctx: Context, config: Config) -> dict[str, Any]:
    """A minimal diffusers + peft LoRA loop on the same FLUX.1 transformer (built by the same function
    with the same seed), LoRA on the same layers, on random latents and text embeddings."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from diffbase.methods.lora import lora_target_names
    from diffbase.models import families
    from diffbase.models.build import build_components

    device, s = ctx.device, ctx.sizes
    m = config.model
    with torch.device(device):  # the transformer alone: text encoders and VAE play no part here
        components = build_components(m, text=False, seed=config.experiment.seed)
    transformer = components.pop("transformer")
    del components
    free(device)
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    lora = config.training.lora
    transformer.add_adapter(
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=0.0,
            init_lora_weights="gaussian",
            target_modules=lora_target_names(transformer, list(families.get("flux1").lora_targets)),
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # trained weights in fp32, the frozen base in bf16 (as diffusers' scripts do)
        p.data = p.data.float()
    if config.hardware.gradient_checkpointing is True:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    c = transformer.config
    side = s.train_res // 16  # VAE /8, then 2x2 packing
    tokens, text_len = side * side, m.text_max_length or 512
    g = torch.Generator().manual_seed(0)
    n = 4
    latents = [torch.randn(1, tokens, c.in_channels, generator=g).to(device) for _ in range(n)]
    text = [torch.randn(1, text_len, c.joint_attention_dim, generator=g).to(device, torch.bfloat16) for _ in range(n)]
    pooled = [torch.randn(1, c.pooled_projection_dim, generator=g).to(device, torch.bfloat16) for _ in range(n)]
    txt_ids = torch.zeros(text_len, 3, device=device)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(tokens, 1), ids.float()], 1).to(device)
    guidance = torch.ones(1, device=device) if c.guidance_embeds else None

    def step(i: int) -> float:
        x0 = latents[i % n]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(1, device=device))  # logit-normal
        noisy = ((1 - sigma) * x0 + sigma * noise).to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = transformer(
                hidden_states=noisy,
                timestep=sigma.to(torch.bfloat16),
                guidance=guidance,
                pooled_projections=pooled[i % n],
                encoder_hidden_states=text[i % n],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # as a loop that logs its loss: the step ends when the GPU is done

    reset_peak(device)
    ends = []
    for i in range(s.train_steps):
        step(i)
        ends.append(time.perf_counter())
    peak = peak_bytes(device)
    seconds, counted = step_seconds(ends, s.warmup_steps)
    with FlopCounterMode(display=False) as counter:  # one more step, counted, not timed
        step(s.train_steps)
    flops = float(counter.get_total_flops())
    return {"s_step": seconds, "counted": counted, "peak": peak, "flops": flops}


def stage_train(ctx: Context) -> None:
    """FLUX.1-dev LoRA: the plain loop, then diffbase cached (and a few steps of it profiled) and uncached."""
    s, own = ctx.sizes, OWN[ctx.tiny]
    cache = f"data.cache_dir={ctx.work / 'cache-flux1'}"
    base = train_config(ctx, own.flux1_train, "flux1-plain")
    ctx.log("train: plain diffusers + peft loop")
    plain = plain_lora(ctx, base)
    free(ctx.device)  # the plain model went with plain_lora's frame
    ctx.metrics["plain_s_step"], ctx.metrics["flops"] = plain["s_step"], plain["flops"]
    checkpointing = "on" if base.hardware.gradient_checkpointing is True else "off"
    label = f"FLUX.1 LoRA r16, {s.train_res}px, batch 1, checkpointing {checkpointing}"
    ctx.add("train", f"{label}, plain diffusers+peft: s/step (median of {plain['counted']})", f"{plain['s_step']:.3f}")
    ctx.add("train", "plain: peak memory (transformer only, no text encoders or VAE loaded)", gib(plain["peak"]))
    ctx.add("train", "FLOPs of one training step (FlopCounterMode, forward + backward)", flop_text(plain["flops"]))
    ctx.add("train", "plain: MFU", mfu(ctx, plain["flops"], plain["s_step"]))

    ctx.log("train: diffbase, cached latents and text (then a few steps under torch.profiler)")
    cached = trained(
        ctx,
        train_config(ctx, own.flux1_train, "flux1-cached", "data.cache_latents=true", "data.cache_text=true", cache),
        profile=(ctx.artifacts or ctx.work) / "train-trace.json.gz",
    )
    ctx.metrics["cached_s_step"], ctx.metrics["cached_wall"] = cached["s_step"], cached["wall"]
    report_diffbase(ctx, "train", "diffbase cached", cached, plain["flops"])
    report_profile(ctx, "train", "diffbase cached", cached)

    ctx.log("train: diffbase, uncached")
    uncached = trained(
        ctx, train_config(ctx, own.flux1_train, "flux1-uncached", "data.cache_latents=false", "data.cache_text=false")
    )
    ctx.metrics["uncached_s_step"] = uncached["s_step"]
    report_diffbase(ctx, "train", "diffbase uncached", uncached, plain["flops"])


def stage_klein(ctx: Context) -> None:
    s, own = ctx.sizes, OWN[ctx.tiny]
    config = train_config(ctx, own.klein_train, "klein-cached", "data.cache_latents=true", "data.cache_text=true")
    info = trained(ctx, config)
    ctx.add(
        "klein", f"FLUX.2 klein-4b LoRA r16, {s.train_res}px, batch 1, cached: diffbase s/step", f"{info['s_step']:.3f}"
    )
    ctx.add("klein", "diffbase: peak memory in the training loop", gib(info["peak"]))
    ctx.add("klein", "whole `train()` (build, cache, steps, validation, export)", f"{info['wall']:.1f} s")
    if info["skipped"]:
        ctx.add("klein", "steps skipped for a non-finite loss", str(info["skipped"]))


def stage_lowmem(ctx: Context) -> None:
    """FLUX.1 LoRA on a quantized base (int8, fp8), cached, checkpointing on: s/step against the bf16 base's (stage
    `train`) and the training loop's peak memory (goals: within 24 GiB at <= 1.5x the bf16 step time); on nf4 with
    block swap (fp8 where bitsandbytes cannot run; goal: within 16 GiB); each beside `diffbase plan`'s prediction
    (goal: within 10%); then generation on an int8 transformer (goal: within 12 GiB at 1024x1024) and the same
    with model offload (goal: within 8 GiB)."""
    import importlib.util

    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.placement import offload_hooks
    from diffbase.models.quantize import quantize

    own, cache = OWN[ctx.tiny], f"data.cache_dir={ctx.work / 'cache-flux1'}"
    base_step = ctx.metrics.get("cached_s_step")
    left, needed = ctx.budget_s - ctx.elapsed(), ctx.metrics.get("cached_wall", 0.0) * 4.5
    if left < needed:
        ctx.add("lowmem", "FLUX.1 LoRA on int8 / fp8 bases", f"skipped: {left:.0f} s left, ~{needed:.0f} s needed")
        return
    nf4 = "nf4" if ctx.cuda and importlib.util.find_spec("bitsandbytes") else "fp8"
    if nf4 != "nf4":
        why = "no CUDA" if not ctx.cuda else "bitsandbytes is not installed (or failed its check)"
        ctx.add("lowmem", "nf4 base with block swap", f"not run: {why}; the fp8 base with block swap stands in")
    # as a 24 GB user runs it (`diffbase plan --gpu-memory 24`'s advice): checkpointing on; without it the int8 base
    # alone is predicted at about 40 GiB. Block swap implies checkpointing.
    checkpointed, swap = ["hardware.gradient_checkpointing=true"], ["hardware.offload=blocks"]
    runs = [(kind, f"flux1-{kind}{'-swap' if swap[0] in extra else ''}", goal, ["data.cache_latents=true",
             "data.cache_text=true", cache, f"model.quantize={kind}", *extra])
            for kind, extra, goal in (("int8", checkpointed, 24), ("fp8", checkpointed, 24), (nf4, [*swap, *checkpointed], 16))]  # fmt: skip
    predicted = [planned(ctx, own.flux1_train, name, *settings) for _, name, _, settings in runs]  # before device time
    for (kind, name, goal, settings), prediction in zip(runs, predicted, strict=True):
        swapped = swap[0] in settings
        how = f"{kind} base" + (", block swap" if swapped else "") + ", checkpointing on"
        ctx.log(f"lowmem: diffbase, cached, {how}")
        info = trained(ctx, train_config(ctx, own.flux1_train, name, *settings))
        label = f"FLUX.1 LoRA r16 on a {how}, {ctx.sizes.train_res}px, batch 1, cached"
        peak = info["peak"]
        ctx.add("lowmem", f"{label}: s/step", f"{info['s_step']:.3f}")
        ctx.add("lowmem", f"{label}: peak memory in the training loop", gib(peak), f"<= {goal} GiB",
                verdict(peak / GIB, goal) if peak is not None else "")  # fmt: skip
        plan_row(ctx, label, peak, prediction)
        if base_step and not swapped:
            ratio = info["s_step"] / base_step
            ctx.add("lowmem", f"{label}: s/step over the bf16 base's (stage train: checkpointing off)", f"{ratio:.2f}",
                    "<= 1.5", verdict(ratio, 1.5) if ctx.cuda else "")  # fmt: skip
    ctx.log("lowmem: generation on an int8 transformer, then with model offload")
    h, w = own.gen_hw
    pipe, spec = flux1_pipeline(ctx)
    quantize(pipe.transformer, "int8", pipe.transformer.dtype)
    settings = GenerateSettings(prompt=PROMPT, seed=0, steps=own.gen_steps, height=h, width=w)
    for offload, goal in (("none", 12), ("model", 8)):
        if offload != "none":
            offload_hooks(pipe.to("cpu"), ctx.device, offload)
        reset_peak(ctx.device)
        generate(pipe, spec, settings)
        peak = peak_bytes(ctx.device)
        ctx.add("lowmem", f"FLUX.1-dev {h}x{w}, {own.gen_steps} steps, int8 transformer, offload {offload}: peak memory",
                gib(peak), f"<= {goal} GiB", verdict(peak / GIB, goal) if peak is not None else "")  # fmt: skip
    ctx.shared.pop("flux1_pipe", None)  # quantized and offloaded now: no later stage may take it for the bf16 one


def planned(ctx: Context, experiment: str, name: str, *extra: str) -> float:
    """`diffbase plan`'s predicted peak (bytes) of the run train_config(ctx, experiment, name, *extra) makes."""
    from diffbase.config import configs_dir
    from diffbase.plan import plan

    return sum(p.bytes for p in plan(configs_dir() / experiment, bench_overrides(ctx, name, *extra)))


def plan_row(ctx: Context, label: str, peak: float | None, predicted: float) -> None:
    """`diffbase plan`'s predicted peak of the run beside the measured one (goal: within 10%)."""
    if peak is None:
        ctx.add("lowmem", f"{label}: `diffbase plan` predicted peak", gib(predicted))
        return
    off = abs(peak / predicted - 1)
    ctx.add("lowmem", f"{label}: `diffbase plan` predicted peak (measured / predicted {peak / predicted:.2f})",
            gib(predicted), "within 10%", verdict(off, 0.10))  # fmt: skip


def stage_auto(ctx: Context) -> None:
    own = OWN[ctx.tiny]
    left = ctx.budget_s - ctx.elapsed()
    needed = ctx.metrics.get("cached_wall", 0.0) * 1.2
    if left < needed:
        ctx.add(
            "auto",
            "FLUX.1 LoRA with gradient checkpointing `auto`",
            f"skipped: {left:.0f} s left, ~{needed:.0f} s needed",
        )
        return
    config = train_config(
        ctx,
        own.flux1_train,
        "flux1-auto",
        "data.cache_latents=true",
        "data.cache_text=true",
        f"data.cache_dir={ctx.work / 'cache-flux1'}",
        "hardware.gradient_checkpointing=auto",
    )
    info = trained(ctx, config)
    on = "on" if info["checkpointing"] else "off"
    ctx.add(
        "auto", f"FLUX.1 LoRA, cached, checkpointing `auto` (chose: {on}): diffbase s/step", f"{info['s_step']:.3f}"
    )
    ctx.add("auto", "peak memory in the training loop (the probe step included)", gib(info["peak"]))
    ctx.add("auto", "MFU", mfu(ctx, ctx.metrics.get("flops"), info["s_step"]))


# --------------------------------------------------------------------------- inference


def bare_call(pipe: Any, spec: Any, settings: Any, steps: int) -> Any:
    """The plain FluxPipeline call diffbase's generate() is measured against."""
    from diffbase.models.backbone import text_length

    with torch.inference_mode():
        return pipe(
            prompt=settings.prompt,
            num_inference_steps=steps,
            height=settings.height,
            width=settings.width,
            generator=torch.Generator("cpu").manual_seed(settings.seed),
            output_type="pil",
            **text_length(pipe, spec.family),
        ).images[0]


def stage_generate(ctx: Context) -> None:
    from diffbase.generate import GenerateSettings, generate

    s, own = ctx.sizes, OWN[ctx.tiny]
    h, w = own.gen_hw
    ctx.log("generate: building FLUX.1")
    pipe, spec = flux1_pipeline(ctx)
    settings = GenerateSettings(prompt=PROMPT, seed=0, steps=own.gen_steps, height=h, width=w)
    ctx.log("generate: warm-up")
    generate(pipe, spec, replace(settings, steps=s.sample_warmup_steps))
    bare_call(pipe, spec, settings, s.sample_warmup_steps)
    ctx.log("generate: timing")
    t = interleaved(lambda: generate(pipe, spec, settings), lambda: bare_call(pipe, spec, settings, own.gen_steps),
                    own.gen_repeats, ctx.device)  # fmt: skip
    ctx.metrics["generate_ratio"] = t["ratio"]
    ctx.metrics["generate_eager_s"] = t["ours"]
    label = f"FLUX.1-dev {h}x{w}, {own.gen_steps} steps"
    ctx.add("generate", f"{label}: diffbase `generate()`, s/image", f"{t['ours']:.2f}")
    ctx.add("generate", f"{label}: bare FluxPipeline call, s/image", f"{t['theirs']:.2f}")


def stage_compile(ctx: Context) -> None:
    """FLUX.1 generate with the transformer's blocks compiled (`--compile`): diffbase's generate() against the bare
    pipeline call on the same compiled transformer (so the ratio is fair), the first image's compile time, the
    graphs dynamo built, and the speed-up over the eager generate stage when it ran in this process."""
    from diffbase.compile import compile_blocks, graphs
    from diffbase.generate import GenerateSettings, generate

    own = OWN[ctx.tiny]
    h, w = own.gen_hw
    pipe, spec = flux1_pipeline(ctx)
    ctx.shared.pop("flux1_pipe", None)  # compiled now: no later stage may take it for the eager one
    settings = GenerateSettings(prompt=PROMPT, seed=0, steps=own.gen_steps, height=h, width=w)
    before = graphs()
    count = compile_blocks(pipe.transformer)
    start = time.perf_counter()
    generate(pipe, spec, settings)  # compiles every block class at these shapes
    first = time.perf_counter() - start
    bare_call(pipe, spec, settings, own.gen_steps)
    t = interleaved(lambda: generate(pipe, spec, settings), lambda: bare_call(pipe, spec, settings, own.gen_steps),
                    own.gen_repeats, ctx.device)  # fmt: skip
    label = f"FLUX.1-dev {h}x{w}, {own.gen_steps} steps, {count} blocks compiled"
    ctx.add("compile", f"{label}: diffbase `generate()`, s/image", f"{t['ours']:.2f}")
    ctx.add("compile", f"{label}: bare FluxPipeline call (same compiled blocks), s/image", f"{t['theirs']:.2f}")
    ctx.add("compile", "ratio diffbase / bare, compiled", f"{t['ratio']:.3f}", "<= 1.0", verdict(t["ratio"], 1.0))
    ctx.add("compile", "first image (compiles), s", f"{first:.1f}")
    ctx.metrics["compiled_s"], ctx.metrics["compile_first_s"] = t["ours"], first
    ctx.add(
        "compile", "graphs dynamo built (2 block classes; more: graph breaks or recompiles)", str(graphs() - before)
    )
    if "generate_eager_s" in ctx.metrics:
        speedup = ctx.metrics["generate_eager_s"] / t["ours"]
        ctx.add("compile", "eager / compiled s/image (diffbase)", f"{speedup:.2f}x")
    if not ctx.tiny:  # stage fp8 starts from it (saves a build and a compile); dropped if fp8 is not next. On
        ctx.shared[COMPILED] = pipe, spec  # --tiny fp8 stays eager: compiling int8dq on a CPU adds a minute to CI


COMPILED = "flux1_compiled"  # ctx.shared key: stage compile's pipeline, handed to stage fp8
HANDED = {COMPILED: "fp8"}  # what a stage leaves in ctx.shared -> the stage that takes it

FP8_PROMPTS = (
    PROMPT,
    "a red fox in fresh snow at golden hour",
    "a bowl of ramen on a wooden table, top view",
    "a city street at night in the rain, neon signs",
)


def psnr(a: Any, b: Any) -> float:
    """PSNR of two RGB pictures, dB (inf when equal): diffbase.metrics.scores.psnr, as validation computes it."""
    from diffbase.data.datasets import to_tensor
    from diffbase.metrics.scores import psnr as per_image

    def unit(picture: Any) -> torch.Tensor:
        return (to_tensor(picture.convert("RGB"))[None] + 1) / 2

    return float(per_image(unit(a), unit(b))[0])


def fp8_seconds(ctx: Context) -> float:
    """The fp8 stage's time, estimated: 10 images and 1-2 compiles (one when stage compile hands its pipeline
    over: its timings are then known; else from the eager generate stage's, or a guess of 15 s an image)."""
    if COMPILED in ctx.shared and "compiled_s" in ctx.metrics:
        return ctx.metrics["compiled_s"] * 10 + ctx.metrics["compile_first_s"] * 1.5 + 30
    return ctx.metrics.get("generate_eager_s", 15.0) * 10 + 180


def stage_fp8(ctx: Context) -> None:
    """FLUX.1 generation with the transformer's Linear layers in torchao float8 (`--quantize fp8dq`: weights and
    activations, a scale per row) against bf16, both with the blocks compiled (eager on --tiny, where compiling is
    stage `compile`'s and would only add minutes): s/image over the same 4 prompts and seeds, each after one
    warm-up image that compiles; peak memory; each fp8 picture's PSNR against bf16's. fp8dq needs CUDA >= 8.9:
    without it, int8dq (int8 weights and activations) stands in, labelled, and the fp8 rows say n/a."""
    from diffbase.compile import compile_blocks
    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.quantize import quantize
    from diffbase.runtime import fp8_refusal, torch_capability

    own = OWN[ctx.tiny]
    h, w = own.gen_hw
    refusal = fp8_refusal(torch_capability(ctx.device))
    kind = "int8dq" if refusal else "fp8dq"
    left, needed = ctx.budget_s - ctx.elapsed(), fp8_seconds(ctx)
    if not ctx.tiny and left < needed:
        ctx.add("fp8", "FLUX.1 generation, bf16 vs fp8dq", f"skipped: {left:.0f} s left, ~{needed:.0f} s needed")
        return
    handed = ctx.shared.pop(COMPILED, None)  # stage compile's, its blocks compiled and warm at these shapes
    pipe, spec = handed or flux1_pipeline(ctx)
    ctx.shared.pop("flux1_pipe", None)  # compiled and quantized here: no later stage may take it for the bf16 one
    how = "eager (--tiny)" if ctx.tiny and not handed else "blocks compiled"
    if not ctx.tiny and not handed:
        compile_blocks(pipe.transformer)
    runs = [
        GenerateSettings(prompt=p, seed=i, steps=own.gen_steps, height=h, width=w) for i, p in enumerate(FP8_PROMPTS)
    ]

    def measure() -> dict[str, Any]:
        first = timed(lambda: generate(pipe, spec, runs[0]), ctx.device)  # compiles at these shapes
        reset_peak(ctx.device)
        images: list[Any] = []
        seconds = [timed(lambda s=settings: images.append(generate(pipe, spec, s)), ctx.device) for settings in runs]
        return {"images": images, "s": statistics.mean(seconds), "first": first, "peak": peak_bytes(ctx.device)}

    label = f"FLUX.1-dev {h}x{w}, {own.gen_steps} steps, {how}"
    name = kind if kind == "fp8dq" else f"{kind} (stand-in: fp8dq needs CUDA >= 8.9)"
    first = "first image (compiles), s" if how == "blocks compiled" else "first image, s"
    ctx.log(f"fp8: bf16, {how}" + (" (stage compile's pipeline)" if handed else ""))
    bf16 = measure()
    ctx.add("fp8", f"{label}, bf16: s/image (mean of {len(runs)} prompts)", f"{bf16['s']:.2f}")
    ctx.add("fp8", f"{label}, bf16: peak memory", gib(bf16["peak"]))
    warm = " (compiled by stage compile: this one only warms up)" if handed else ""
    ctx.add("fp8", f"bf16: {first if not handed else 'first image, s'}{warm}", f"{bf16['first']:.1f}")
    ctx.log(f"fp8: {kind}, {how}")
    quantize(pipe.transformer, kind, torch.bfloat16)  # in place, on the device; the compiled blocks recompile
    low = measure()
    psnrs = [psnr(a, b) for a, b in zip(bf16["images"], low["images"], strict=True)]
    ctx.add("fp8", f"{label}, {name}: s/image (mean of {len(runs)} prompts)", f"{low['s']:.2f}")
    ctx.add("fp8", f"{label}, {name}: peak memory", gib(low["peak"]))
    ctx.add("fp8", f"{kind}: {first}", f"{low['first']:.1f}")
    ctx.add("fp8", f"bf16 / {kind} s/image (speed-up)", f"{bf16['s'] / low['s']:.2f}x")
    mean = f"{statistics.mean(psnrs):.1f}"
    ctx.add("fp8", f"{kind} PSNR against bf16 (same prompts and seeds), mean of {len(runs)}, dB", mean)
    ctx.add("fp8", f"{kind} PSNR against bf16, lowest of {len(runs)}, dB", f"{min(psnrs):.1f}")
    if refusal:  # what a GPU of compute capability >= 8.9 fills in
        for measure_name in ("fp8dq: s/image", "bf16 / fp8dq s/image (speed-up)", "fp8dq PSNR against bf16, dB"):
            ctx.add("fp8", f"{label}, {measure_name}", "n/a (needs CUDA >= 8.9)")


# --------------------------------------------------------------------------- the stages


def all_stages() -> list[Stage]:
    """This file's stages and every method package's (its bench.py), in the order they run: the trainers, then
    everything that uses the shared FLUX.1 pipeline (built once, freed after), then the methods' training."""
    from diffbase import methods

    methods.load_all()  # the methods' config sections (training.lora, ...) are known to `load_config`
    found = [stage for package in methods.packages() if (bench := methods.part(package, "bench"))
             for stage in bench.STAGES]  # fmt: skip
    return [
        Stage("train", stage_train),
        Stage("klein", stage_klein),
        Stage("generate", stage_generate, flux1=True),
        *[stage for stage in found if stage.flux1],
        *[stage for stage in found if not stage.flux1],
        Stage("auto", stage_auto),
        Stage("lowmem", stage_lowmem),
        Stage("compile", stage_compile),
        Stage("fp8", stage_fp8),
    ]


# --------------------------------------------------------------------------- report


def ratio_rows(ctx: Context, stages: list[Stage]) -> None:
    m = ctx.metrics

    def ratio(stage: str, measure: str, top: str, bottom: str, limit: float) -> None:
        if top in m and bottom in m:
            value = m[top] / m[bottom]
            ctx.add(stage, measure, f"{value:.3f}", f"<= {limit}", verdict(value, limit))
        else:
            ctx.add(stage, measure, "n/a (a stage it needs failed or did not run)", f"<= {limit}")

    ratio("ratios", "training s/step, diffbase (cached) / plain diffusers+peft", "cached_s_step", "plain_s_step", 1.0)
    ratio("ratios", "training s/step, diffbase uncached / cached", "uncached_s_step", "cached_s_step", 1.3)
    m.setdefault("one", 1.0)
    ratio("ratios", "generation time, diffbase `generate()` / bare FluxPipeline", "generate_ratio", "one", 1.02)
    for stage in stages:  # the methods' own: a metric over plain generation
        for measure, metric, goal in stage.ratios:
            ratio("ratios", measure, metric, "one", goal)


def render(ctx: Context, title: str) -> str:
    import diffusers

    lines = [
        f"## {title}",
        "",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), diffusers {diffusers.__version__}, "
        f"python {platform.python_version()}, {datetime.date.today().isoformat()}, "
        f"{'tiny models (code paths only; timings mean nothing)' if ctx.tiny else 'full size, random weights, bf16'}, "
        f"total {ctx.elapsed():.0f} s.",
        *ctx.notes,
        "",
        "| stage | measure | value | goal | result |",
        "|---|---|---|---|---|",
    ]
    for r in ctx.rows:
        cells = [r.stage, r.measure, r.value, r.goal, r.result]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_out(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_stage(ctx: Context, name: str, fn: Callable[[Context], None]) -> None:
    ctx.log(f"stage {name}: start")
    start = time.perf_counter()
    try:
        fn(ctx)
    except Exception as exc:  # one stage's failure is reported, and the others still run
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        ctx.errors[name] = f"{type(exc).__name__}: {first}"
        ctx.add(name, "error", ctx.errors[name], result="ERROR")
        if ctx.cuda and "illegal memory access" in str(exc):
            ctx.log("the CUDA context is broken; later stages will fail too")
    finally:
        free(ctx.device)
    ctx.log(f"stage {name}: {'failed' if name in ctx.errors else 'done'} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    known = all_stages()
    names = [stage.name for stage in known]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, 32-64 px, 2-3 steps (CI, on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda at full size, cpu with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the `auto` run only starts if it fits in this")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    asked = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(asked) - set(names))
    if unknown:
        print(f"benchmarks/gpu.py: --stages: unknown {unknown}; choose from {','.join(names)}", file=sys.stderr)
        return 2
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models are all overhead; threads only add noise on a shared machine
    title, notes = describe(device, args.tiny)
    chosen = [stage for stage in known if stage.name in asked]
    with tempfile.TemporaryDirectory(prefix="diffbase-gpu-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(TINY if args.tiny else FULL, device, args.tiny, work, args.budget_s, notes=notes,
                      artifacts=args.out.parent if args.out else None)  # fmt: skip
        ctx.log(f"{title}: stages {', '.join(stage.name for stage in chosen)}; work in {work}")
        for i, stage in enumerate(chosen):
            run_stage(ctx, stage.name, stage.run)
            later = chosen[i + 1 :]
            if not any(stage.flux1 for stage in later):
                ctx.shared.pop("flux1_pipe", None)  # no later stage needs the FLUX.1 pipeline
            for key, taker in HANDED.items():
                if not later or later[0].name != taker:  # handed only to the very next stage: memory
                    ctx.shared.pop(key, None)
            free(device)
            if args.out:  # what is done so far survives a crash or a time limit
                write_out(args.out, render(ctx, f"{title}: diffbase vs plain diffusers (partial)"))
        ctx.shared.clear()
        ratio_rows(ctx, known)
        table = render(ctx, f"{title}: diffbase vs plain diffusers")
    print(table, flush=True)
    if args.out:
        write_out(args.out, table)
    if ctx.errors:
        print(f"stages that failed: {', '.join(ctx.errors)}", file=sys.stderr, flush=True)
    return 1 if ctx.errors else 0


def describe(device: torch.device, tiny: bool) -> tuple[str, list[str]]:
    """The table's title and the lines under it; on CUDA, diffbase's attention choice set for every stage."""
    if device.type != "cuda":
        return ("CPU (tiny)" if tiny else "CPU"), [f"{torch.get_num_threads()} CPU thread(s)"]
    from diffbase.attention import apply_attention, choose

    choice = choose("auto", device)
    apply_attention(choice, [])  # what diffbase's training sets anyway: the same for every stage, plain included
    total = torch.cuda.get_device_properties(device).total_memory
    title = torch.cuda.get_device_name(device) + (" (tiny)" if tiny else "")
    return title, [f"{total / GIB:.0f} GiB; SDPA kernels for every stage: {', '.join(choice.kernels)} (cuDNN off)"]


if __name__ == "__main__":
    sys.exit(main())
