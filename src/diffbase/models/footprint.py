"""What a diffusers folder's weights take on the GPU, read from its safetensors headers (no tensor is loaded), so a
command refuses a model that cannot fit before loading it, with the settings that would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffbase.errors import UserError

GIB = 2**30


def component_params(folder: Path) -> dict[str, int]:
    """Parameters per component subfolder, from the shapes in its safetensors headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = 0
        for file in sub.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
        if total:
            counts[sub.name] = total
    return counts


def resident_bytes(counts: dict[str, int], denoiser: str, dtype: str, quantize: Any, offload: str) -> float:
    """The bytes on the GPU at once of components with these parameter counts: every component (model offload:
    the largest one; blocks and sequential: about none, a block or a layer at a time)."""
    from diffbase.models.quantize import weight_bytes

    kind = quantize if isinstance(quantize, str) else "none"
    sizes = [weight_bytes(n, dtype, kind if name == denoiser else "none") for name, n in counts.items()]
    if offload in ("blocks", "sequential") or not sizes:
        return 0.0
    return max(sizes) if offload == "model" else sum(sizes)


def check_fits(folder: Path, spec: Any, dtype: str, quantize: Any, offload: str, device: Any) -> None:
    """On a GPU: a model whose weights cannot be resident at once is refused before loading, naming what fits."""
    from diffbase import runtime

    total = runtime.gpu_memory(device)
    if total is None:
        return
    counts = component_params(folder)  # the headers, read once

    def need(kind: Any, how: str) -> float:
        return resident_bytes(counts, spec.denoiser, dtype, kind, how)

    needed = need(quantize, offload)
    if needed <= total:
        return
    options = [("--quantize int8", need("int8", offload)), ("--quantize nf4", need("nf4", offload)),
               ("--offload model", need(quantize, "model")), ("--offload blocks", 0.0)]  # fmt: skip
    fit = next(name for name, size in options if size <= total)
    raise UserError(f"--model: {folder}'s weights take {needed / GIB:.1f} GiB in {dtype} at once, "
                    f"more than this GPU's {total / GIB:.1f} GiB; try {fit}")  # fmt: skip
