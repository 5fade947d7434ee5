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
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from diffbase.config import Config, configs_dir, load_config

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s, SXM
GIB = 2**30
PROMPT = "a photo of a woman in a red dress"
STAGES = ("train", "klein", "generate", "dreamo", "upscale", "dreamfit", "tryon", "dreamfit_train", "kontext", "auto")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between full size and --tiny."""

    flux1_train: str  # experiment configs (relative to configs/)
    klein_train: str
    flux1_model: str
    tryon_model: str
    tryon_overrides: tuple[str, ...]
    train_res: int
    train_steps: int
    images: int
    val_steps: int
    gen_hw: tuple[int, int]
    gen_steps: int
    gen_repeats: int
    dreamfit_hw: tuple[int, int]
    dreamfit_steps: int
    dreamfit_rank: int
    dreamfit_repeats: int
    tryon_hw: tuple[int, int]
    tryon_steps: int
    dreamo_hw: tuple[int, int] = (1024, 1024)  # the official app's default, 12 steps, 512 px references
    dreamo_ref: int = 512
    dreamo_steps: int = 12
    dreamo_repeats: int = 2
    upscale_from: int = 1024  # 1024x1024 -> 2048x2048, 1024 px tiles with 128 px overlap (9 tiles)
    upscale_tile: int = 1024
    upscale_overlap: int = 128
    upscale_steps: int = 20
    dino_config: tuple[int, int, int] = (768, 12, 12)  # ViT-B/14: width, layers, heads
    warmup_steps: int = 2  # training steps left out of s/step
    sample_warmup_steps: int = 2  # sampling steps of each warm-up call


FULL = Sizes(
    flux1_train="experiments/flux1_dev_lora.yaml",
    klein_train="experiments/flux2_klein_4b_lora.yaml",
    flux1_model="models/flux1_dev.yaml",
    tryon_model="experiments/catvton_sd15.yaml",
    tryon_overrides=(),
    train_res=1024,
    train_steps=8,
    images=8,
    val_steps=3,
    gen_hw=(1024, 1024),
    gen_steps=28,
    gen_repeats=2,
    dreamfit_hw=(1024, 768),
    dreamfit_steps=28,
    dreamfit_rank=32,  # the official checkpoints' rank
    dreamfit_repeats=1,  # its goal (1.3) is loose; the time goes to generate's 1.02
    tryon_hw=(1024, 768),
    tryon_steps=50,
)
TINY = Sizes(
    flux1_train="experiments/tiny/flux1_lora.yaml",
    klein_train="experiments/tiny/flux2_klein_lora.yaml",
    flux1_model="models/flux1_tiny.yaml",
    tryon_model="models/sd15_tiny.yaml",
    tryon_overrides=("model.unet.in_channels=9", "training.vton.variant=catvton"),
    train_res=64,
    train_steps=5,
    images=4,
    val_steps=2,
    gen_hw=(64, 64),
    gen_steps=3,
    gen_repeats=2,
    dreamfit_hw=(64, 48),
    dreamfit_steps=3,
    dreamfit_rank=4,
    dreamfit_repeats=2,
    tryon_hw=(64, 48),
    tryon_steps=3,
    dreamo_hw=(64, 64),
    dreamo_ref=32,
    dreamo_steps=2,
    dreamo_repeats=1,
    upscale_from=32,
    upscale_tile=32,
    upscale_overlap=16,
    upscale_steps=3,
    dino_config=(32, 2, 2),
    sample_warmup_steps=1,
)


@dataclass
class Row:
    stage: str
    measure: str
    value: str
    goal: str = ""
    result: str = ""


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    tiny: bool
    work: Path
    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # objects handed from one stage to the next
    notes: list[str] = field(default_factory=list)  # lines under the title

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        memory = ""
        if self.cuda:
            memory = f" [{torch.cuda.memory_allocated(self.device) / GIB:.1f} GiB allocated]"
        print(f"[{self.elapsed():6.1f} s] {message}{memory}", flush=True)

    def add(self, stage: str, measure: str, value: str, goal: str = "", result: str = "") -> None:
        self.rows.append(Row(stage, measure, value, goal, result))


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / GIB:.1f} GiB"


def flop_text(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f} FLOP"


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def step_seconds(step_ends: list[float], warmup: int) -> tuple[float, int]:
    """Median step time from perf_counter() stamps at the end of each step, the first `warmup` steps
    left out (step k lasts from the end of step k-1 to its own end), and how many steps that is."""
    durations = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:], strict=True)]
    if len(durations) < 2:
        raise RuntimeError(f"{len(step_ends)} training steps finished; need at least {warmup + 2}")
    return statistics.median(durations), len(durations)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The bf16 dense peak of this GPU, when it is one we know."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, name


def mfu(ctx: Context, flops: float | None, seconds: float) -> str:
    peak, name = peak_flops(ctx.device)
    if not ctx.cuda:
        return "n/a (CPU)"
    if flops is None:
        return "n/a (no FLOP count: the plain stage failed)"
    if peak is None:
        return f"n/a (no bf16 peak known for {name})"
    return f"{100 * flops / seconds / peak:.1f} % ({flops / seconds / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f})"


def verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "FAIL"


def write_images(folder: Path, count: int, size: int) -> Path:
    """A small captioned image folder: coloured shapes on plain backgrounds."""
    colours = {"red": (205, 40, 40), "blue": (40, 80, 210), "green": (40, 160, 60), "yellow": (235, 205, 40)}
    backgrounds = {"white": (245, 245, 245), "grey": (128, 128, 128)}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = list(colours)[i % len(colours)]
        background = list(backgrounds)[(i // len(colours)) % len(backgrounds)]
        shape = ("square", "circle")[i % 2]
        img = Image.new("RGB", (size, size), backgrounds[background])
        draw = ImageDraw.Draw(img)
        a, b = size * (2 + i % 3) // 10, size * (7 + i % 2) // 10
        (draw.rectangle if shape == "square" else draw.ellipse)([a, a, b, b], fill=colours[colour])
        img.save(folder / f"{i:03d}.jpg", quality=95)
        (folder / f"{i:03d}.txt").write_text(f"a {colour} {shape} on a {background} background")
    return folder


def train_config(ctx: Context, experiment: str, name: str, *extra: str) -> Config:
    """An experiment config at benchmark settings: random weights, bf16, batch 1, rank 16, a few steps,
    one validation image at the end, no checkpoints in between."""
    s = ctx.sizes
    data = ctx.shared.get("data") or write_images(ctx.work / "data", s.images, s.train_res)
    ctx.shared["data"] = data
    return load_config(
        configs_dir() / experiment,
        [
            f"experiment.output_dir={ctx.work / name}",
            "experiment.seed=0",
            f"data.train_path={data}",
            f"data.resolution={s.train_res}",
            "model.random_weights=true",
            "model.dtype=bfloat16",
            f"hardware.device={ctx.device}",
            "hardware.mixed_precision=bf16",
            "hardware.gradient_checkpointing=false",
            "training.batch_size=1",
            "training.gradient_accumulation=1",
            f"training.max_steps={s.train_steps}",
            "training.lora.rank=16",
            "training.lora.alpha=16",
            "training.checkpoint_every=0",
            "training.schedule.type=constant",
            "training.schedule.warmup_steps=0",
            "training.validation.every=0",
            f"training.validation.prompts=[{PROMPT}]",
            f"training.validation.steps={s.val_steps}",
            f"training.validation.size=[{s.train_res},{s.train_res}]",
            "training.validation.loss_split=0",
            *extra,
        ],
    )


# --------------------------------------------------------------------------- training


def register_methods() -> None:
    """The methods' config sections (training.lora, ...) are known to `load_config` once imported."""
    import diffbase.methods

    diffbase.methods.load_all()


def train_entry() -> Callable[..., Any]:
    """diffbase's own `train(config)`, as `diffbase train` calls it."""
    from diffbase.methods import train

    return train


def diffbase_train(ctx: Context, config: Config, export: str = "diffusers", validation: bool = True) -> dict[str, Any]:
    """One run of diffbase's `train(config)`, with the peak memory of its training loop (the loop is
    wrapped so the peak is reset where it starts: model building and caching are left out)."""
    import diffbase.training.train as T

    real, seen = getattr(T, "run_training", None), {}

    def measured(*args: Any, **kwargs: Any) -> Any:
        seen["setup_peak"] = peak_bytes(ctx.device)  # building the model and filling the cache
        reset_peak(ctx.device)
        seen["loop_start"] = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seen["peak"] = peak_bytes(ctx.device)

    start = time.perf_counter()
    reset_peak(ctx.device)
    if real is not None:  # else the loop moved: the peak then covers the whole run, model building included
        T.run_training = measured
    try:
        result = train_entry()(config, show_progress=False)
    finally:
        if real is not None:
            T.run_training = real
    seen.setdefault("peak", peak_bytes(ctx.device))
    sync(ctx.device)
    wall = time.perf_counter() - start
    out = Path(config.experiment.output_dir)
    exports = json.loads((out / "exports.json").read_text()) if (out / "exports.json").is_file() else {}
    if not exports.get(export) or not Path(exports[export]).exists():
        raise RuntimeError(f"no {export} export in {out}")
    if validation and not list((out / "validation").glob("*.png")):
        raise RuntimeError(f"no validation image in {out / 'validation'}")
    seconds, counted = step_seconds(result.step_times, ctx.sizes.warmup_steps)
    denoiser = result.backbone.denoiser
    info = {
        "s_step": seconds,
        "counted": counted,
        "peak": seen.get("peak"),
        "run_peak": None if seen["peak"] is None else max(seen["peak"], seen.get("setup_peak") or 0.0),
        "wall": wall,
        "setup": seen.get("loop_start", start) - start,
        "skipped": result.skipped_nonfinite,
        "checkpointing": bool(getattr(denoiser, "is_gradient_checkpointing", False)),
        "family": config.model.family,
    }
    for attr in ("backbone", "trained"):  # the model goes now, not when the result does
        if hasattr(result, attr):
            setattr(result, attr, None)
    del result, denoiser
    free(ctx.device)
    return info


def report_diffbase(ctx: Context, stage: str, label: str, info: dict[str, Any], flops: float | None) -> None:
    s = ctx.sizes
    ctx.add(
        stage,
        f"{label}: s/step (median of {info['counted']} after {s.warmup_steps} warm-up)",
        f"{info['s_step']:.3f}",
    )
    ctx.add(stage, f"{label}: peak memory in the training loop", gib(info["peak"]))
    ctx.add(stage, f"{label}: peak memory over the whole run (building the model included)", gib(info["run_peak"]))
    if flops is not None or info["family"] == "flux1":
        ctx.add(stage, f"{label}: MFU", mfu(ctx, flops, info["s_step"]))
    ctx.add(
        stage,
        f"{label}: whole `train()` (setup {info['setup']:.0f} s: build and cache; {s.train_steps} steps; validation; export)",
        f"{info['wall']:.1f} s",
    )
    if info["skipped"]:
        ctx.add(stage, f"{label}: steps skipped for a non-finite loss", str(info["skipped"]))


def plain_lora(ctx: Context, config: Config) -> dict[str, Any]:
    """A minimal diffusers + peft LoRA loop on the same FLUX.1 transformer (built by the same function
    with the same seed), LoRA on the same layers, on random latents and text embeddings."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from diffbase.methods.lora import LORA_TARGETS, lora_target_names
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
            target_modules=lora_target_names(transformer, LORA_TARGETS["flux1"]),
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
    """FLUX.1-dev LoRA: the plain loop, then diffbase cached and uncached."""
    s = ctx.sizes
    cache = f"data.cache_dir={ctx.work / 'cache-flux1'}"
    base = train_config(ctx, s.flux1_train, "flux1-plain")
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

    ctx.log("train: diffbase, cached latents and text")
    cached = diffbase_train(
        ctx, train_config(ctx, s.flux1_train, "flux1-cached", "data.cache_latents=true", "data.cache_text=true", cache)
    )
    ctx.metrics["cached_s_step"], ctx.metrics["cached_wall"] = cached["s_step"], cached["wall"]
    report_diffbase(ctx, "train", "diffbase cached", cached, plain["flops"])

    ctx.log("train: diffbase, uncached")
    uncached = diffbase_train(
        ctx, train_config(ctx, s.flux1_train, "flux1-uncached", "data.cache_latents=false", "data.cache_text=false")
    )
    ctx.metrics["uncached_s_step"] = uncached["s_step"]
    report_diffbase(ctx, "train", "diffbase uncached", uncached, plain["flops"])


def stage_klein(ctx: Context) -> None:
    s = ctx.sizes
    config = train_config(ctx, s.klein_train, "klein-cached", "data.cache_latents=true", "data.cache_text=true")
    info = diffbase_train(ctx, config)
    ctx.add(
        "klein", f"FLUX.2 klein-4b LoRA r16, {s.train_res}px, batch 1, cached: diffbase s/step", f"{info['s_step']:.3f}"
    )
    ctx.add("klein", "diffbase: peak memory in the training loop", gib(info["peak"]))
    ctx.add("klein", "whole `train()` (build, cache, steps, validation, export)", f"{info['wall']:.1f} s")
    if info["skipped"]:
        ctx.add("klein", "steps skipped for a non-finite loss", str(info["skipped"]))


def stage_dreamfit_train(ctx: Context) -> None:
    """DreamFit training as a user runs it on an 80 GB card: try-on pairs, cached latents and prompts
    (the text encoders and VAE encoder freed), the write pass checkpointed."""
    from diffbase.toy.synthetic import write_dataset

    s = ctx.sizes
    h, w = s.dreamfit_hw
    data = write_dataset(ctx.work / "tryon-pairs", s.images, 0, size=(w, h))  # (width, height)
    config = load_config(
        configs_dir() / s.flux1_model,
        [
            f"experiment.output_dir={ctx.work / 'dreamfit-train'}",
            f"data.train_path={data}",
            "data.cache_latents=true",
            "data.cache_text=true",
            "model.random_weights=true",
            "model.dtype=bfloat16",
            f"hardware.device={ctx.device}",
            "hardware.mixed_precision=bf16",
            "hardware.gradient_checkpointing=true",
            "training.method=dreamfit",
            "training.dreamfit.mode=tryon",
            f"training.dreamfit.size=[{h},{w}]",
            "training.dreamfit.rank=16",
            "training.dreamfit.checkpoint_passes=[write]",
            "training.batch_size=1",
            f"training.max_steps={s.train_steps}",
            "training.checkpoint_every=0",
            "training.validation.loss_split=0",
        ],
    )
    ctx.log("dreamfit_train: diffbase, cached, write pass checkpointed")
    info = diffbase_train(ctx, config, export="dreamfit", validation=False)
    label = f"DreamFit try-on r16, {h}x{w}, batch 1, cached, write pass checkpointed"
    seconds = f"{info['s_step']:.3f}"
    ctx.add("dreamfit_train", f"{label}: s/step", seconds, "<= 1.6", verdict(info["s_step"], 1.6) if ctx.cuda else "")
    peak = info["peak"]
    ctx.add(
        "dreamfit_train", f"{label}: peak memory in the training loop", gib(peak), "<= 60 GiB",
        verdict(peak / GIB, 60) if peak is not None else "",
    )  # fmt: skip


def stage_kontext(ctx: Context) -> None:
    """Kontext LoRA through `train(config)`: twice the tokens of a text-to-image step (the source's
    reference tokens), the source latents cached."""
    from diffbase.toy.synthetic import write_edit_pairs

    s = ctx.sizes
    res = s.train_res
    data = write_edit_pairs(ctx.work / "edit-pairs", s.images, size=(res, res))
    model = "experiments/flux1_kontext_dev_lora.yaml" if not ctx.tiny else "experiments/tiny/flux1_kontext.yaml"
    config = train_config(
        ctx, model, "kontext", f"data.train_path={data / 'metadata.jsonl'}", "data.cache_latents=true",
        "data.cache_text=true", "training.validation.loss_split=0", "training.validation.prompts=[]",
    )  # fmt: skip
    ctx.log("kontext: diffbase, cached")
    info = diffbase_train(ctx, config, validation=False)
    label = f"FLUX.1 Kontext LoRA r16, {res}px target + {res}px source, batch 1, cached"
    ctx.add("kontext", f"{label}: s/step", f"{info['s_step']:.3f}")
    ctx.add("kontext", f"{label}: peak memory in the training loop", gib(info["peak"]))


def stage_auto(ctx: Context) -> None:
    s = ctx.sizes
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
        s.flux1_train,
        "flux1-auto",
        "data.cache_latents=true",
        "data.cache_text=true",
        f"data.cache_dir={ctx.work / 'cache-flux1'}",
        "hardware.gradient_checkpointing=auto",
    )
    info = diffbase_train(ctx, config)
    on = "on" if info["checkpointing"] else "off"
    ctx.add(
        "auto", f"FLUX.1 LoRA, cached, checkpointing `auto` (chose: {on}): diffbase s/step", f"{info['s_step']:.3f}"
    )
    ctx.add("auto", "peak memory in the training loop (the probe step included)", gib(info["peak"]))
    ctx.add("auto", "MFU", mfu(ctx, ctx.metrics.get("flops"), info["s_step"]))


# --------------------------------------------------------------------------- inference


def flux1_pipeline(ctx: Context) -> tuple[Any, Any]:
    """The FLUX.1 pipeline with random bf16 weights, built on the device; shared by generate and dreamfit."""
    if "flux1_pipe" in ctx.shared:
        return ctx.shared["flux1_pipe"]
    from diffbase.models.build import build_pipeline
    from diffbase.models.specs import spec_for

    config = load_config(configs_dir() / ctx.sizes.flux1_model, ["model.dtype=bfloat16", "model.random_weights=true"])
    with torch.device(ctx.device):
        pipe = build_pipeline(config.model, seed=0)
    pipe.set_progress_bar_config(disable=True)
    ctx.shared["flux1_pipe"] = pipe, spec_for(config.model.family, config.model.variant)
    return ctx.shared["flux1_pipe"]


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int, device: torch.device) -> dict:
    """Seconds of each, alternating which goes first, and the median of the per-pair ratios."""
    mine, base, ratios = [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            b, o = timed(theirs, device), timed(ours, device)
        else:
            o, b = timed(ours, device), timed(theirs, device)
        mine.append(o)
        base.append(b)
        ratios.append(o / b)
    return {"ours": statistics.median(mine), "theirs": statistics.median(base), "ratio": statistics.median(ratios)}


def stage_generate(ctx: Context) -> None:
    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.backbone import text_length

    s = ctx.sizes
    h, w = s.gen_hw
    ctx.log("generate: building FLUX.1")
    pipe, spec = flux1_pipeline(ctx)
    settings = GenerateSettings(prompt=PROMPT, seed=0, steps=s.gen_steps, height=h, width=w)

    def bare(steps: int) -> Any:
        with torch.inference_mode():
            return pipe(
                prompt=settings.prompt,
                num_inference_steps=steps,
                height=h,
                width=w,
                generator=torch.Generator("cpu").manual_seed(settings.seed),
                output_type="pil",
                **text_length(pipe, spec.family),
            ).images[0]

    ctx.log("generate: warm-up")
    generate(pipe, spec, replace(settings, steps=s.sample_warmup_steps))
    bare(s.sample_warmup_steps)
    ctx.log("generate: timing")
    t = interleaved(lambda: generate(pipe, spec, settings), lambda: bare(s.gen_steps), s.gen_repeats, ctx.device)
    ctx.metrics["generate_ratio"] = t["ratio"]
    label = f"FLUX.1-dev {h}x{w}, {s.gen_steps} steps"
    ctx.add("generate", f"{label}: diffbase `generate()`, s/image", f"{t['ours']:.2f}")
    ctx.add("generate", f"{label}: bare FluxPipeline call, s/image", f"{t['theirs']:.2f}")


def stage_dreamo(ctx: Context) -> None:
    """DreamO with 1 and 2 references over plain FLUX.1 (benchmarks/dreamo.py's measurement), exact and cached."""
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dreamo import measure  # benchmarks/dreamo.py

    s = ctx.sizes
    pipe, _ = flux1_pipeline(ctx)
    emb = DreamOEmbeddings.for_pipe(pipe)
    torch.nn.init.normal_(emb.task.weight, std=0.02)
    torch.nn.init.normal_(emb.idx.weight, std=0.02)
    emb = emb.to(ctx.device, pipe.transformer.dtype)
    ctx.log("dreamo: timing plain, 1 and 2 references, exact and cached")
    results = measure(pipe, emb, s.dreamo_hw, s.dreamo_ref, s.dreamo_steps, s.dreamo_repeats)
    h, w = s.dreamo_hw
    label = f"{h}x{w}, {s.dreamo_ref} px references, {s.dreamo_steps} steps"
    for name, value in results.items():
        ctx.add("dreamo", f"{label}: {name}", f"{value:.3f}")
    ctx.metrics["dreamo_ratio"] = results["1 ref, exact: over plain"]


def stage_upscale(ctx: Context) -> None:
    """The tiled upscaler, fused tiles, with and without a DINOv2 ViT-B/14 (random weights) and its adapter."""
    from transformers import Dinov2Config, Dinov2Model

    from diffbase.methods.upscale.mechanism.dino import DinoAdapter
    from diffbase.methods.upscale.mechanism.sampling import UpscaleSettings, upscale
    from diffbase.methods.upscale.mechanism.tiles import tile_grid

    s = ctx.sizes
    pipe, _ = flux1_pipeline(ctx)
    width, layers, heads = s.dino_config
    with torch.device(ctx.device):
        dino = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                        intermediate_size=4 * width, patch_size=14, image_size=518))  # fmt: skip
        adapter = DinoAdapter(width, pipe.transformer.config.joint_attention_dim)
    dino = dino.to(pipe.transformer.dtype).eval()
    adapter = adapter.to(pipe.transformer.dtype)
    image = Image.new("RGB", (s.upscale_from, s.upscale_from), (120, 140, 160))
    ImageDraw.Draw(image).ellipse(
        [s.upscale_from // 4, s.upscale_from // 4, 3 * s.upscale_from // 4, 3 * s.upscale_from // 4], fill=(230, 60, 40)
    )
    settings = UpscaleSettings(
        scale=2.0, strength=0.35, steps=s.upscale_steps, tile=s.upscale_tile, overlap=s.upscale_overlap
    )
    f = pipe.vae_scale_factor
    side = 2 * s.upscale_from
    tiles = len(tile_grid(side // f, side // f, s.upscale_tile // f, s.upscale_overlap // f))
    label = f"{s.upscale_from}x{s.upscale_from} -> {side}x{side}, {tiles} tiles of {s.upscale_tile} px, {s.upscale_steps} steps at strength 0.35"
    for name, extra in (("plain", (None, None)), ("DINO ViT-B/14 + adapter", (dino, adapter))):
        ctx.log(f"upscale: {name}")
        upscale(
            pipe, image.resize((s.upscale_from // 2, s.upscale_from // 2)), replace(settings, steps=2), *extra
        )  # warm-up
        reset_peak(ctx.device)
        seconds = timed(lambda extra=extra: upscale(pipe, image, settings, *extra), ctx.device)
        ctx.add("upscale", f"{label}, {name}: s/image", f"{seconds:.2f}")
        ctx.add("upscale", f"{label}, {name}: peak memory", gib(peak_bytes(ctx.device)))


def stage_dreamfit(ctx: Context) -> None:
    from diffbase.methods.dreamfit.mechanism.checkpoint import (
        NETWORK_ALPHA,
        Dims,
        LoraPair,
        diffusers_name,
        random_official,
    )
    from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings, dreamfit_generate, reference_image
    from diffbase.methods.dreamfit.mechanism.passes import install
    from diffbase.models.backbone import text_length

    s = ctx.sizes
    h, w = s.dreamfit_hw
    ctx.log("dreamfit: FLUX.1 pipeline")
    pipe, _ = flux1_pipeline(ctx)
    t = pipe.transformer
    pairs = {}
    for key, (down, up) in random_official(Dims.of(t), rank=s.dreamfit_rank).items():
        kind, index, name = key.split("_blocks.")[0], int(key.split(".")[1]), key.split(".", 2)[2]
        pairs[diffusers_name(kind, index, name)] = LoraPair(
            down.to(ctx.device, t.dtype), up.to(ctx.device, t.dtype), NETWORK_ALPHA / down.shape[0]
        )
    stock = dict(t.attn_processors)
    state = install(t, pairs)
    ours_processors = dict(t.attn_processors)
    guidance = 4.0
    settings = DreamFitSettings(
        prompt=PROMPT, mode="garment", steps=s.dreamfit_steps, guidance=guidance, height=h, width=w
    )
    garment = Image.new("RGB", (w, h), (200, 40, 40))
    ImageDraw.Draw(garment).rectangle([w // 4, h // 5, 3 * w // 4, 4 * h // 5], fill=(240, 240, 240))
    reference = reference_image("garment", garment, (w, h))

    def plain(steps: int) -> Any:  # diffusers' own attention processors, the DreamFit hooks idle
        t.set_attn_processor(dict(stock))  # diffusers empties the dict it is given
        state.mode = "off"
        return pipe(
            prompt=PROMPT,
            height=h,
            width=w,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            **text_length(pipe, "flux1"),
        ).images[0]

    def dreamfit(steps: int) -> Any:
        t.set_attn_processor(dict(ours_processors))
        return dreamfit_generate(pipe, state, replace(settings, steps=steps), reference)

    ctx.log("dreamfit: warm-up")
    dreamfit(s.sample_warmup_steps)
    plain(s.sample_warmup_steps)
    ctx.log("dreamfit: timing")
    timing = interleaved(
        lambda: dreamfit(s.dreamfit_steps), lambda: plain(s.dreamfit_steps), s.dreamfit_repeats, ctx.device
    )
    ctx.metrics["dreamfit_ratio"] = timing["ratio"]
    label = f"{h}x{w}, {s.dreamfit_steps} steps, LoRA rank {s.dreamfit_rank}"
    ctx.add("dreamfit", f"DreamFit generation (garment mode), {label}: s/image", f"{timing['ours']:.2f}")
    ctx.add(
        "dreamfit", f"plain FLUX.1 generation, {h}x{w}, {s.dreamfit_steps} steps: s/image", f"{timing['theirs']:.2f}"
    )
    state.clear()
    ctx.shared.pop("flux1_pipe", None)  # the last user of the FLUX.1 pipeline


def stage_tryon(ctx: Context) -> None:
    from diffbase.methods.tryon.mechanism.sampling import TryOnSettings, tryon
    from diffbase.methods.tryon.mechanism.vton import prepare_unet
    from diffbase.models.backbone import Backbone
    from diffbase.models.build import build_pipeline
    from diffbase.models.specs import spec_for

    s = ctx.sizes
    config = load_config(
        configs_dir() / s.tryon_model, [*s.tryon_overrides, "model.dtype=bfloat16", "model.random_weights=true"]
    )
    v = config.training.vton
    ctx.log("tryon: building the SD1.5 UNet (9 input channels)")
    with torch.device(ctx.device):
        pipe = build_pipeline(config.model, seed=0)
    prepare_unet(pipe.unet, v.variant)
    pipe.unet.eval()
    bb = Backbone(spec_for(config.model.family, config.model.variant), pipe)
    h, w = s.tryon_hw
    g = torch.Generator().manual_seed(0)
    person = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    garment = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 5 : 3 * h // 5, w // 5 : 4 * w // 5] = 1
    settings = TryOnSettings(steps=s.tryon_steps, guidance=2.5, eta=v.eta)
    ctx.log("tryon: warm-up")
    tryon(bb, v.variant, person, garment, mask, replace(settings, steps=s.sample_warmup_steps))
    ctx.log("tryon: timing")
    seconds = timed(lambda: tryon(bb, v.variant, person, garment, mask, settings), ctx.device)
    ctx.add(
        "tryon",
        f"CatVTON ({v.variant}) try-on, SD1.5-size UNet, {h}x{w} person ({2 * h}x{w} canvas), "
        f"{s.tryon_steps} DDIM steps, guidance 2.5: s/image",
        f"{seconds:.2f}",
    )


# --------------------------------------------------------------------------- report


def ratio_rows(ctx: Context) -> None:
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
    ratio(
        "ratios",
        "DreamFit generation / plain FLUX.1 generation (goal of benchmarks/dreamfit.py)",
        "dreamfit_ratio",
        "one",
        1.3,
    )
    ratio("ratios", "DreamO generation, 1 reference, exact mode / plain FLUX.1 generation", "dreamo_ratio", "one", 1.6)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, 32-64 px, 2-3 steps (CI, on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda at full size, cpu with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the `auto` run only starts if it fits in this")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    register_methods()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"benchmarks/gpu.py: --stages: unknown {unknown}; choose from {','.join(STAGES)}", file=sys.stderr)
        return 2
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models are all overhead; threads only add noise on a shared machine
    if device.type == "cuda":
        from diffbase.attention import apply_attention, choose

        choice = choose("auto", device)
        apply_attention(choice, [])  # what diffbase's training sets anyway: the same for every stage, plain included
        title = torch.cuda.get_device_name(device) + (" (tiny)" if args.tiny else "")
        total = torch.cuda.get_device_properties(device).total_memory
        notes = [f"{total / GIB:.0f} GiB; SDPA kernels for every stage: {', '.join(choice.kernels)} (cuDNN off)"]
    else:
        title = "CPU (tiny)" if args.tiny else "CPU"
        notes = [f"{torch.get_num_threads()} CPU thread(s)"]
    functions = {
        "train": stage_train,
        "klein": stage_klein,
        "generate": stage_generate,
        "dreamo": stage_dreamo,
        "upscale": stage_upscale,
        "dreamfit": stage_dreamfit,
        "tryon": stage_tryon,
        "dreamfit_train": stage_dreamfit_train,
        "kontext": stage_kontext,
        "auto": stage_auto,
    }
    with tempfile.TemporaryDirectory(prefix="diffbase-gpu-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(TINY if args.tiny else FULL, device, args.tiny, work, args.budget_s, notes=notes)
        ctx.log(f"{title}: stages {', '.join(stages)}; work in {work}")
        chosen = [name for name in STAGES if name in stages]
        for i, name in enumerate(chosen):
            run_stage(ctx, name, functions[name])
            if not {"generate", "dreamfit"} & set(chosen[i + 1 :]):
                ctx.shared.pop("flux1_pipe", None)  # no later stage needs the FLUX.1 pipeline
                free(device)
            if args.out:  # what is done so far survives a crash or a time limit
                write_out(args.out, render(ctx, f"{title}: diffbase vs plain diffusers (partial)"))
        ctx.shared.clear()
        ratio_rows(ctx)
        table = render(ctx, f"{title}: diffbase vs plain diffusers")
    print(table, flush=True)
    if args.out:
        write_out(args.out, table)
    if ctx.errors:
        print(f"stages that failed: {', '.join(ctx.errors)}", file=sys.stderr, flush=True)
    return 1 if ctx.errors else 0


if __name__ == "__main__":
    sys.exit(main())
