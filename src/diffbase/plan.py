"""`diffbase plan`: the GPU memory a training run as configured needs at its peak, from parameter counts on the
meta device (no weights, no GPU), and which change makes it fit a given memory.

peak = the weights resident while the loop runs + what trains (fp32 weights, gradients, optimizer state) +
activations. The first two are counted exactly from the model and the method; activations are an estimate:
bytes per image-and-text token per unit of (transformer width x blocks), calibrated on FLUX.1-dev LoRA at
1024 px on an H200 (50.0 GiB measured, benchmarks/RESULTS.md), and a tenth of that with gradient
checkpointing. FLUX.1-dev uncached (58.9 GiB measured) is predicted at 59.4 GiB; FLUX.2 klein-4b, measured at
23.5 GiB, is predicted 16% low (19.7 GiB) by the same rule: treat the
activations as a guide until each family is measured (benchmarks/gpu.py). UNet families (SD1.5, SDXL) have no
activation estimate yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbase.data.buckets import largest_resolution
from diffbase.errors import UserError
from diffbase.models.footprint import GIB

# fp32 weight + gradient + optimizer state per parameter: AdamW two moments; Lion one; Prodigy AdamW's plus its
# initial weights and a running sum; Adafactor factored second moments (about nothing for a matrix)
TRAINED_BYTES = {
    "adamw": 16.0,
    "adamw8bit": 10.0,
    "lion": 12.0,
    "lion8bit": 9.0,
    "prodigy": 24.0,
    "adafactor": 8.0,
    "adamw_schedulefree": 16.0,
}  # (schedule-free AdamW: its z sequence and second moment)
EMA_BYTES = 4.0  # training.ema: diffusers' EMAModel keeps an fp32 copy of what trains on the device
ACTIVATION_BYTES = 36.3  # per token per width x block, FLUX.1-dev LoRA 1024 px, checkpointing off (calibrated)
CHECKPOINTED = 0.1  # activations kept with gradient checkpointing, of those without


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    how: str


def swapped_count(config: Any, module: Any) -> int:
    """With `hardware.offload: blocks`, the denoiser parameters on the GPU at once: all but the swapped blocks,
    plus the three a pass holds (the block running and its neighbours)."""
    from diffbase.models.block_swap import transformer_blocks

    sizes = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(module)]
    swapped = sorted(sizes[config.hardware.keep_blocks :], reverse=True)
    return sum(p.numel() for p in module.parameters()) - sum(swapped) + sum(swapped[:3])


def resident(config: Any, counts: dict[str, int], denoiser: str) -> list[Part]:
    """The components on the GPU while the loop runs: the denoiser always; the text encoders unless the text is
    cached (then they wait on the CPU for validation) or offloaded; the VAE (its decoder draws validation images)."""
    from diffbase.models.quantize import plan as quantize_plan
    from diffbase.models.quantize import weight_bytes
    from diffbase.models.specs import spec_for

    m, d = config.model, config.data
    spec = spec_for(m.family, m.variant)
    keys = {te.component: te.key for te in spec.text_encoders}
    table = quantize_plan(m.quantize, ["denoiser", *keys.values()])
    parts = []
    for name, count in counts.items():
        is_text = name in keys
        if is_text and (d.cache_text or config.hardware.offload in ("model", "blocks")):
            continue
        kind = table.get("denoiser" if name == denoiser else keys.get(name, ""), "none")
        how = f"{count / 1e9:.2f}B parameters in {kind if kind != 'none' else m.dtype}"
        if name == denoiser and config.hardware.offload == "blocks":
            how += f"; blocks after the first {config.hardware.keep_blocks} swapped in, 3 at a time"
        parts.append(Part(f"weights: {name}", weight_bytes(count, m.dtype, kind), how))
    return parts


def activations(config: Any, denoiser_config: dict[str, Any]) -> Part | None:
    """The estimate for a transformer family (None for a UNet: not calibrated)."""
    if "num_layers" not in denoiser_config:
        return None
    width = denoiser_config.get("num_attention_heads", 0) * denoiser_config.get("attention_head_dim", 0)
    blocks = denoiser_config["num_layers"] + denoiser_config.get("num_single_layers", 0)
    side = largest_resolution(config.data) // 16  # latents /8, 2x2 patches; the largest size is the peak
    tokens = config.training.batch_size * (side * side + (config.model.text_max_length or 512))
    checkpointed = config.hardware.gradient_checkpointing is True or config.hardware.offload == "blocks"
    value = tokens * width * blocks * ACTIVATION_BYTES * (CHECKPOINTED if checkpointed else 1.0)
    how = f"{tokens} tokens x width {width} x {blocks} blocks, checkpointing {'on' if checkpointed else 'off'}"
    return Part("activations (estimate)", value, how)


def plan(path: str | Path, overrides: list[str] | None = None) -> list[Part]:
    """The parts of the predicted peak of an experiment config (the model built once, on the meta device)."""
    from diffbase.config import load_config
    from diffbase.info import component_counts, meta_components, trainable
    from diffbase.models.specs import spec_for

    config = load_config(Path(path), overrides)
    spec = spec_for(config.model.family, config.model.variant)
    components = meta_components(path, overrides)
    counts = component_counts(path, components=components)
    if config.hardware.offload == "blocks":
        counts[spec.denoiser] = swapped_count(config, components[spec.denoiser])
    parts = resident(config, counts, spec.denoiser)
    denoiser_config = dict(components[spec.denoiser].config)  # read before the method adds to the model
    trains = trainable(path, overrides, components)
    if trains is not None:
        count = trains[0]
        per = TRAINED_BYTES[config.training.optimizer.type] + (EMA_BYTES if config.training.ema.enabled else 0.0)
        ema = " (the EMA copy included)" if config.training.ema.enabled else ""
        parts.append(Part("what trains", count * per, f"{count / 1e6:.1f}M parameters x {per:g} bytes{ema}"))
    act = activations(config, denoiser_config)
    if act is not None:
        parts.append(act)
    return parts


def spec_of(path: str | Path, overrides: list[str]) -> Any:
    from diffbase.config import load_config
    from diffbase.models.specs import spec_for

    m = load_config(Path(path), overrides).model
    return spec_for(m.family, m.variant)


def advice(path: str | Path, overrides: list[str], budget_gib: float) -> list[str]:
    """The settings, one change at a time and then together, that bring the predicted peak within the budget, in
    the order they cost speed (checkpointing, cached text, an int8 then nf4 base)."""
    steps = [["hardware.gradient_checkpointing=true"], ["data.cache_text=true"], ["model.quantize=int8"],
             ["model.quantize=nf4"], ["hardware.offload=blocks"]]  # fmt: skip
    if spec_of(path, overrides).denoiser != "transformer":  # block swap is for transformer blocks
        steps = steps[:-1]
    chosen: list[str] = []
    out = []
    for step in steps:
        chosen = [*chosen, *step]
        total = sum(p.bytes for p in plan(path, [*overrides, *chosen])) / GIB
        out.append(f"{' '.join(chosen)}: {total:.1f} GiB")
        if total <= budget_gib:
            return out
    raise UserError(f"--gpu-memory: {budget_gib:g} GiB is less than the smallest setting's predicted peak ({out[-1]})")


def describe(path: str, overrides: list[str], budget_gib: float | None = None, trace: bool = False) -> str:
    """The predicted peak part by part; with `trace` also the peak of two steps traced on fake tensors
    (diffbase.plan_trace), which `--gpu-memory` then judges."""
    parts = plan(path, overrides)
    total = sum(p.bytes for p in parts) / GIB
    width = max(len(p.name) for p in parts)
    lines = [f"{p.name:<{width}}  {p.bytes / GIB:7.2f} GiB  ({p.how})" for p in parts]
    lines.append(f"{'predicted peak':<{width}}  {total:7.2f} GiB")
    if trace:
        total = traced_total(path, overrides, lines, width)
    if budget_gib is not None:
        if total <= budget_gib:
            lines.append(f"fits in {budget_gib:g} GiB as configured")
        else:
            lines.append(f"does not fit in {budget_gib:g} GiB; the first settings that do (the last line fits"
                         + (", by the estimate: trace it to check" if trace else "") + "):")  # fmt: skip
            lines += [f"  {line}" for line in advice(path, overrides, budget_gib)]
    return "\n".join(lines)


def traced_total(path: str | Path, overrides: list[str], lines: list[str], width: int) -> float:
    """The traced peak (GiB), its lines added. What the two traced steps do not hold is added as the estimate
    counts it: another optimizer's state than AdamW's, the EMA copy, and with gradient accumulation the
    gradients kept while the next micro-batch runs."""
    from diffbase.config import load_config
    from diffbase.plan_trace import trace

    step = trace(path, overrides, on_gpu(path, overrides))
    t = load_config(Path(path), overrides).training
    added = {f"{t.optimizer.type}'s state": TRAINED_BYTES[t.optimizer.type] - TRAINED_BYTES["adamw"],
             "the EMA copy": EMA_BYTES if t.ema.enabled else 0.0,
             "the accumulated gradients": 4.0 if t.gradient_accumulation > 1 else 0.0}  # fmt: skip
    extra = step.trained * sum(added.values())
    counted = [name for name, per in added.items() if per]
    note = f"; {', '.join(counted)} counted as estimated" if counted else ""
    total = (step.peak + extra) / GIB
    lines.append(f"{'traced peak':<{width}}  {total:7.2f} GiB  (two steps on fake tensors in {step.seconds:.0f} s: "
                 f"{step.how}{note})")  # fmt: skip
    return total


def on_gpu(path: str | Path, overrides: list[str]) -> set[str]:
    """The pipeline components whose weights stay on the GPU while the loop runs (as `resident` counts them)."""
    from diffbase.config import load_config
    from diffbase.models.specs import spec_for

    config = load_config(Path(path), overrides)
    spec = spec_for(config.model.family, config.model.variant)
    names = [spec.denoiser, "vae", *(te.component for te in spec.text_encoders)]
    return {p.name.removeprefix("weights: ") for p in resident(config, dict.fromkeys(names, 0), spec.denoiser)}


def check_fits(path: str | Path, overrides: list[str], device: Any) -> None:
    """Before anything loads: a run whose exactly counted part (weights and what trains) cannot fit the GPU is
    refused with the settings that would fit; one whose estimate with activations does not fit gets a note."""
    import sys

    from diffbase import runtime

    total = runtime.gpu_memory(device)
    if total is None:
        return
    parts = plan(path, overrides)
    exact = sum(p.bytes for p in parts if p.name != "activations (estimate)")
    estimate = sum(p.bytes for p in parts)
    if exact > total:
        tried = advice_or_none(path, overrides, total / GIB)
        raise UserError(f"model: the weights and what trains take {exact / GIB:.1f} GiB, more than this GPU's "
                        f"{total / GIB:.1f} GiB; {tried} (diffbase plan {path} --gpu-memory {total / GIB:.0f})")  # fmt: skip
    if estimate > total:
        print(f"note: diffbase plan estimates a {estimate / GIB:.1f} GiB peak against this GPU's {total / GIB:.1f} GiB;"
              " if it runs out of memory, see diffbase plan --gpu-memory", file=sys.stderr)  # fmt: skip


def advice_or_none(path: str | Path, overrides: list[str], budget_gib: float) -> str:
    try:
        return "it fits with " + advice(path, overrides, budget_gib)[-1].rsplit(":", 1)[0]
    except UserError:
        return "no setting diffbase has fits it"
