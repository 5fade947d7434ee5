"""Which attention kernel runs, as configuration (`hardware.attention_backend`, `--attention`).

PyTorch's scaled-dot-product attention picks among its kernels (flash, memory-efficient, cuDNN,
math) by itself. On H100/H200 with torch >= 2.11 its default choice, cuDNN, made FLUX LoRA training
give non-finite losses or an illegal memory access in the backward pass (plain diffusers too; an
isolated attention call of the same shapes passes, only whole-model runs show it; PyTorch issue
196678). So `auto` keeps cuDNN's kernel off on CUDA and lets torch choose among the others.

Names:
- `auto`: the above; elsewhere every kernel enabled, PyTorch's default (the switches are process-wide
  and steer the CPU's choice between its flash and math kernels too, so `auto` also undoes an earlier
  choice made in the same process).
- `flash`, `efficient`, `cudnn`, `math`: only that SDPA kernel (an error at the first attention
  call if it cannot run those shapes; `diffbase doctor` shows which work here).
- any other name is one of diffusers' attention backends (`native`, `_native_cudnn`, `flash_attn`
  for the flash-attn package, `_flash_3`, `sage`, `xformers`, ...), set on the denoiser with
  `set_attention_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffbase.errors import UserError, closest

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
DIFFUSERS_ALIASES = {"flash_attn": "flash"}  # diffusers calls the flash-attn package backend "flash"


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # what the user asked for
    kernels: tuple[str, ...] = SDPA_KERNELS  # the SDPA kernels left enabled
    diffusers_backend: str | None = None  # set on the denoiser instead

    def describe(self) -> str:
        if self.diffusers_backend:
            return f"{self.name}: diffusers backend '{self.diffusers_backend}'"
        if self.kernels == SDPA_KERNELS:
            return f"{self.name}: PyTorch's default SDPA choice"
        return f"{self.name}: SDPA kernels {', '.join(self.kernels)}"


def diffusers_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def choose(name: str, device: torch.device, key: str = "hardware.attention_backend") -> AttentionChoice:
    """What `name` means on `device`; unknown names are a one-line error with the closest match."""
    if name == "auto":
        if device.type == "cuda":
            return AttentionChoice(name, kernels=("flash", "efficient", "math"))
        return AttentionChoice(name, kernels=SDPA_KERNELS)
    if name in SDPA_KERNELS:
        return AttentionChoice(name, kernels=(name,))
    backend = DIFFUSERS_ALIASES.get(name, name)
    if backend.endswith("_hub"):
        raise UserError(f"{key}: '{name}' downloads its kernel from a hub at run time; diffbase never fetches")
    known = [b for b in diffusers_backends() if not b.endswith("_hub")]
    if backend not in known:
        options = ["auto", *SDPA_KERNELS, *DIFFUSERS_ALIASES, *[b for b in known if b != "flash"]]
        raise UserError(f"{key}: unknown attention backend '{name}'{closest(name, options)}")
    return AttentionChoice(name, diffusers_backend=backend)


def set_sdpa_kernels(kernels: tuple[str, ...]) -> None:
    """Enable exactly these SDPA kernels (process-wide; on a CPU they choose between flash and math)."""
    b = torch.backends.cuda
    b.enable_flash_sdp("flash" in kernels)
    b.enable_mem_efficient_sdp("efficient" in kernels)
    b.enable_cudnn_sdp("cudnn" in kernels)
    b.enable_math_sdp("math" in kernels)


def apply_attention(choice: AttentionChoice, models: list[Any]) -> None:
    """Put the choice in force for these denoisers (and the process's SDPA settings)."""
    set_sdpa_kernels(choice.kernels)
    if choice.diffusers_backend:
        for model in models:
            if model is None or not hasattr(model, "set_attention_backend"):
                continue
            try:
                model.set_attention_backend(choice.diffusers_backend)
            except (ImportError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"attention backend '{choice.name}': {first[:200]}") from None
            if not backends_in_use(model):  # diffusers skips processors that have no backend switch
                raise UserError(
                    f"attention backend '{choice.name}': {type(model).__name__}'s attention processors do not take "
                    f"diffusers backends; use auto, {', '.join(SDPA_KERNELS)}"
                )


def backends_in_use(model: Any) -> set[str]:
    """The diffusers attention backends the model's processors are set to (empty: they have none)."""
    found = set()
    for module in model.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            found.add(getattr(backend, "value", str(backend)))
    return found


def check_kernel(kernel: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One attention forward and backward with only `kernel` enabled, against the math kernel in fp32:
    status ok / unavailable / non-finite / mismatch, and the largest differences (output, gradients)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g) for _ in range(3))
    grad = torch.randn(2, 4, 256, 64, generator=g)

    def run(inputs: list[torch.Tensor], backend: Any, run_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [x.to(device, run_dtype).requires_grad_(True) for x in inputs]
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves)
        out.backward(grad.to(device, run_dtype))
        return (out.detach().float().cpu(), *(x.grad.float().cpu() for x in leaves))

    reference = run([q, k, v], SDPBackend.MATH, torch.float32)
    try:
        got = run([q, k, v], backends[kernel], dtype)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"kernel": kernel, "status": "unavailable", "detail": first.split(". ")[0][:100]}
    if not all(torch.isfinite(t).all() for t in got):
        return {"kernel": kernel, "status": "non-finite", "detail": "NaN or inf in output or gradients"}
    errors = [float((a - b).abs().max()) for a, b in zip(got, reference, strict=True)]
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    status = "ok" if max(errors) <= tolerance else "mismatch"
    return {
        "kernel": kernel,
        "status": status,
        "detail": f"max |diff| out {errors[0]:.2e}, grads {max(errors[1:]):.2e}",
    }
