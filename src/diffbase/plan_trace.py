"""`diffbase plan --trace`: the peak of a training run measured, not estimated, without weights or a GPU. The
configured model is built at full size on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory),
the method prepares it as `train` does, and two steps of diffbase's own loss, backward and AdamW run under
training.memory.LiveBytes, which counts every storage alive at once: the resident weights, what trains, its
gradients and optimizer state, the activations and the temporaries. On fake tensors the CPU's attention kernel
stands in for the GPU's (both keep the output and its log-sum-exp for the backward, not the attention matrix),
and CPU autocast's rules for CUDA's: CUDA's gives normalisations and softmax fp32 outputs where the CPU's keeps
bf16, so a UNet's trace (GroupNorm before SiLU everywhere) may read low until one is measured on a GPU.

Checked against an H200 (benchmarks/RESULTS.md): FLUX.1-dev LoRA 1024 px traced 50.9 GiB, measured 50.0;
FLUX.2 klein-4b 25.0 traced, 23.5 measured; the estimate `diffbase plan` prints says 50.3 and 19.7.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError


@dataclass(frozen=True)
class TracedStep:
    peak: int  # bytes alive at once, at the worst moment of the second step
    rest: int  # bytes alive between steps: weights, what trains and its optimizer state, the cached inputs
    trained: int  # parameters that train
    seconds: float
    how: str


def check_traceable(config: Any, method: Any) -> None:
    """What the trace runs as configured: the text-to-image methods' step on an unquantized base, not offloaded."""
    from diffbase.methods import text_to_image

    if method.loss is not text_to_image.loss:
        raise UserError(f"training.method: --trace runs the text-to-image methods' step (lora, full_finetune); "
                        f"{config.training.method}'s own step is estimated only")  # fmt: skip
    if config.model.quantize not in ("none", None):
        raise UserError("model.quantize: --trace builds an unquantized base; the quantized one is estimated only")
    if config.hardware.offload != "none":
        raise UserError(f"hardware.offload: --trace keeps every weight on the GPU; {config.hardware.offload} is "
                        "estimated only")  # fmt: skip


def faked(modules: list[torch.nn.Module], mode: Any, trained: set[int], trained_dtype: torch.dtype | None) -> None:
    """Each parameter and buffer of `modules` (built on the meta device) replaced by a fake CPU tensor of its
    shape and dtype; what trains in `trained_dtype` (fp32 under mixed precision, as the loop keeps it)."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a tensor two modules share (tied embeddings) stays
    # one; the meta original is kept, so that its id is not reused while this runs

    def fake(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=dtype)
            param = isinstance(t, torch.nn.Parameter)
            made[id(t)] = t, torch.nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return made[id(t)][1]

    with mode:
        for module in modules:
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.device.type == "meta":
                        sub._parameters[name] = fake(
                            p, trained_dtype if id(p) in trained and trained_dtype else p.dtype
                        )
                for name, b in list(sub._buffers.items()):
                    if b is not None and b.device.type == "meta":
                        sub._buffers[name] = fake(b, b.dtype)


class Cached:
    """The training cache's lookup as `data.cache_latents` / `data.cache_text` make it: what is cached comes
    from here (made before the step), the rest is encoded in the step, as the loop does."""

    def __init__(self, mean: Any, std: Any, cond: Any) -> None:
        self.mean, self.std, self.cond = mean, std, cond

    def lookup(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        return self.mean, self.std, self.cond


def trace(path: str | Path, overrides: list[str] | None, on_gpu: set[str], fake: bool = True) -> TracedStep:
    """Two training steps of the experiment at `path` on fake tensors, their peak counted with the weights of the
    pipeline components named in `on_gpu` (diffbase.plan.resident's) resident. `fake` False: on real CPU tensors
    with random weights, the same count (for tiny models, to check the fake one against)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffbase.config import load_config
    from diffbase.methods import get
    from diffbase.models.backbone import Backbone
    from diffbase.models.build import assemble_pipeline, build_components, tokenizers
    from diffbase.models.specs import spec_for
    from diffbase.training.memory import LiveBytes

    start = time.perf_counter()
    config = load_config(Path(path), overrides)
    method = get(config.training.method)
    check_traceable(config, method)
    m, spec = config.model, spec_for(config.model.family, config.model.variant)
    with torch.device("meta" if fake else "cpu"):
        built = build_components(m, tiny_tokenizers=False, seed=config.experiment.seed) | tokenizers(m)
        pipe = assemble_pipeline(spec, built, m.pipeline)
        bb = Backbone(spec, pipe)
        torch.manual_seed(config.experiment.seed)
        trained = method.prepare(bb, config)
    mode: Any = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    modules = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    half = config.hardware.mixed_precision != "no"
    if fake:
        faked([*modules.values(), *trained.modules.values()], mode, {id(p) for p in trained.trainable},
              torch.float32 if half else None)  # fmt: skip
    elif half:  # what trains is kept in fp32, as the loop does
        for p in trained.trainable:
            p.data = p.data.float()
    return _steps(config, method, bb, trained, mode, [modules[n] for n in on_gpu], start, LiveBytes())


def _steps(config: Any, method: Any, bb: Any, trained: Any, mode: Any, on_gpu: list[torch.nn.Module],
           start: float, live: Any) -> TracedStep:  # fmt: skip
    """Two steps of the method's loss, backward and AdamW, counted by `live` from the resident weights on."""
    from diffbase.models import backbone as B

    d, t = config.data, config.training
    side = d.resolution if isinstance(d.resolution, int) else max(d.resolution)
    size, n = (side, side), t.batch_size
    params = list({id(p): p for mod in [bb.denoiser, *trained.modules.values()] for p in mod.parameters()
                   if p.requires_grad}.values())  # fmt: skip
    if config.hardware.gradient_checkpointing is True:
        for module in [*trained.modules.values()]:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
    for module in trained.modules.values():
        module.train()
    with mode:
        batch = {"pixels": torch.zeros(n, 3, *size), "caption": ["a photo"] * n, "size": size, "index": list(range(n))}
        mean, std = B.encode_distribution(bb, batch["pixels"]) if d.cache_latents else (None, None)
        cond = B.encode_prompts(bb, batch["caption"], image_hw=size) if d.cache_text else None
        optimizer = torch.optim.AdamW(params, foreach=False)
    for tensor in [*(p for mod in on_gpu for p in mod.parameters()), *(b for mod in on_gpu for b in mod.buffers()),
                   *params, *torch.utils._pytree.tree_leaves((mean, std, cond))]:  # fmt: skip
        live.track(tensor)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.hardware.mixed_precision)
    with mode, live:
        for step in range(2):  # the second starts with the optimizer state the first made
            rest = live.now
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss, _ = method.loss(config, bb, trained, batch, Cached(mean, std, cond), step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    count = sum(p.numel() for p in params)
    setting = config.hardware.gradient_checkpointing
    checkpointing = {True: "on", False: "off"}.get(setting, "auto (traced off, as its probe step runs)")
    how = (f"{config.training.method}, {side} px, batch {n}, checkpointing {checkpointing}, latents "
           f"{'cached' if d.cache_latents else 'encoded'}, text {'cached' if d.cache_text else 'encoded'}")  # fmt: skip
    return TracedStep(live.peak, rest, count, time.perf_counter() - start, how)
