"""`diffbase doctor`: what this machine runs diffbase with, and which attention kernels work here."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from diffbase.attention import SDPA_KERNELS, check_kernel, choose
from diffbase.models.placement import resolve_device

OPTIONAL_BACKENDS = {"flash_attn": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention",
                     "xformers": "xformers"}  # fmt: skip


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(device_name: str = "auto") -> tuple[str, list[dict[str, str]]]:
    """The report as text, and the per-kernel results (for tests)."""
    device = resolve_device(device_name)
    lines = [
        f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'}), "
        + ", ".join(f"{p} {version(p)}" for p in ("diffusers", "transformers", "peft", "accelerate")),
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        lines.append(
            f"device: {device} {props.name}, compute capability {props.major}.{props.minor}, "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        )
    else:
        lines.append("device: cpu (no CUDA device: training and inference run on the CPU; GPU checks need a GPU)")
    what = "bf16" if device.type == "cuda" else "fp32"
    lines.append(f"attention kernels, one {what} forward and backward (2x4x256x64) against the math kernel in fp32:")
    results = [check_kernel(k, device) for k in ("math", *[k for k in SDPA_KERNELS if k != "math"])]
    for r in results:
        lines.append(f"  {r['kernel']:<10} {r['status']:<12} {r['detail']}")
    installed = [name for name, module in OPTIONAL_BACKENDS.items() if importlib.util.find_spec(module)]
    lines.append(f"diffusers backends with their packages installed: {', '.join(['native', *installed])}")
    choice = choose("auto", device)
    note = ""
    if device.type == "cuda":
        note = " (cuDNN's kernel stays off: it gave NaN losses and illegal memory accesses in FLUX training backward)"
        broken = [r["kernel"] for r in results if r["kernel"] in choice.kernels and r["status"] != "ok"]
        if broken:
            note += f"; WARNING: {', '.join(broken)} failed the check here, set hardware.attention_backend"
    lines.append(f"hardware.attention_backend auto uses {choice.describe().split(': ', 1)[1]}{note}")
    return "\n".join(lines), results
