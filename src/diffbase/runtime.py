"""Where and how models run: one `Runtime` (device, weight dtype, attention kernels, offload), parsed by one
helper for every command, the web UI and training, and resolved once (the device checked, the attention
name looked up, the quantization backend found) before any model loads."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffbase.compile import MODES as COMPILE_MODES
from diffbase.errors import UserError

if TYPE_CHECKING:  # torch loads with the first command that runs a model, so `--help` stays fast
    import torch

DTYPES = ("float32", "float16", "bfloat16")
MIXED_PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}  # training's accelerate setting
OFFLOAD = ("none", "model", "sequential", "blocks")
QUANTIZE = ("none", "fp8", "int8", "qint8", "nf4", "fp8dq", "int8dq")  # diffbase.models.quantize
PACKAGES = {"int8": ("torchao", "torchao"), "qint8": ("optimum.quanto", "optimum-quanto"),
            "nf4": ("bitsandbytes", "bitsandbytes"), "fp8dq": ("torchao", "torchao"),
            "int8dq": ("torchao", "torchao")}  # fmt: skip
INFERENCE_ONLY = ("fp8dq", "int8dq")  # activations quantized at every call: for generation, not a trained base
FP8_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm): Ada, Hopper and newer


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: str = "float32"
    attention: str = "auto"
    offload: str = "none"
    quantize: str = "none"  # the denoiser's weights
    offload_blocks: int = 1  # offload blocks: transformer blocks per group moved at once
    compile: bool | str = False  # regional torch.compile of the denoisers: False or its mode (diffbase.compile)

    def loader(self) -> dict[str, Any]:
        """What the loaders take: device, dtype, offload and quantization."""
        return {"device": self.device, "dtype": self.dtype, "offload": self.offload, "quantize": self.quantize,
                "offload_blocks": self.offload_blocks}  # fmt: skip

    def use_attention(self, models: list[Any]) -> None:
        """The attention choice in force for these denoisers (and the process's SDPA settings)."""
        from diffbase.attention import apply_attention, choose

        apply_attention(choose(self.attention, self.device, "--attention"), models)

    def use(self, models: list[Any], backend: bool = True) -> None:
        """The attention choice, and with `compile` each denoiser's repeated blocks compiled (after any adapter
        or processor is in place, so they compile with the blocks). `backend` False: the models keep their own
        attention processors (DreamFit's, try-on's), only the process's SDPA kernel choice applies."""
        self.use_attention(models if backend else [])
        if self.compile:
            from diffbase.compile import compile_blocks, options

            for model in models:
                compile_blocks(model, **options(self.compile))


def gpu_memory(device: Any) -> float | None:
    """The GPU's total memory in bytes (None on a CPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info(device)[1])


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a dtype name stands for."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(name: str | None = "auto", key: str = "--device") -> torch.device:
    """`auto` -> cuda when present, else cpu; a named device that this torch cannot use is a one-line error."""
    import torch

    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}: expected auto, cpu, cuda or cuda:N, got '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"{key}: {name} requested but torch {torch.__version__} ({build}) sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{key}: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve(device: str | None = "auto", dtype: str = "float32", attention: str = "auto", offload: str = "none",
            names: tuple[str, ...] = ("--device", "--dtype", "--attention", "--offload", "--quantize"),
            quantize: str = "none", offload_blocks: int = 1, compile_on: bool | str | None = False) -> Runtime:  # fmt: skip
    """A Runtime from its settings, each checked (`names`: the flags or fields they came from)."""
    from diffbase.attention import choose

    resolved = resolve_device(device, names[0])
    if dtype not in DTYPES:
        raise UserError(f"{names[1]}: expected one of {', '.join(DTYPES)}, got '{dtype}'")
    if offload not in OFFLOAD:
        raise UserError(f"{names[3]}: expected one of {', '.join(OFFLOAD)}, got '{offload}'")
    if offload_blocks < 1:
        raise UserError(f"{names[3]}-blocks: expected a whole number of blocks >= 1, got {offload_blocks}")
    choose(attention, resolved, names[2])
    if quantize not in QUANTIZE:
        raise UserError(f"{names[4]}: expected one of {', '.join(QUANTIZE)}, got '{quantize}'")
    if quantize != "none":
        check_available(quantize, resolved, names[4])
    if quantize == "fp8dq" and dtype != "bfloat16":
        raise UserError(f"{names[4]}: fp8dq scales bfloat16 weights row by row; add {names[1]} bfloat16")
    from diffbase.compile import check

    mode = check(compile_on, offload, "--compile", resolved)
    return Runtime(resolved, dtype, attention, offload, quantize, offload_blocks, mode or False)


def check_available(kind: str, device: torch.device, where: str = "model.quantize") -> None:
    """Before loading: the backend's package is installed and runs on this device."""
    if kind == "nf4" and device.type != "cuda":
        raise UserError(f"{where}: nf4 (bitsandbytes) runs on a CUDA GPU only; on {device.type} use int8, qint8 or fp8")
    if kind == "fp8dq":
        capability = torch_capability(device)
        refusal = fp8_refusal(capability)
        if refusal:
            raise UserError(f"{where}: {refusal}")
    if kind in PACKAGES:
        import importlib.util

        module, package = PACKAGES[kind]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise UserError(f"{where}: {kind} needs {package}: pip install 'diffbase[quantize]'")


def torch_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device` (None: not a CUDA device)."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def fp8_refusal(capability: tuple[int, int] | None) -> str | None:
    """Why fp8dq cannot run on a device of this CUDA compute capability (None: no CUDA device), or None when it
    can: torchao's float8 dynamic quantization needs float8 matmuls, compute capability >= 8.9."""
    need = f"a CUDA GPU with compute capability >= {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Ada, Hopper or newer)"
    if capability is None:
        return f"fp8dq (torchao float8 dynamic quantization) needs {need}; without one use int8dq or int8"
    if tuple(capability) < FP8_CAPABILITY:
        return (f"fp8dq (torchao float8 dynamic quantization) needs {need}; this GPU is "
                f"{capability[0]}.{capability[1]}: use int8dq, int8 or fp8")  # fmt: skip
    return None


def add_arguments(p: argparse.ArgumentParser, dtype_default: str | None = "float32", offload: bool = True) -> None:
    """--device, --dtype, --attention (and --offload) for a command. With `dtype_default` None (training and
    caching) an option left out leaves the config's own value."""
    p.add_argument("--device", default="auto" if dtype_default else None,
                   help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")  # fmt: skip
    p.add_argument("--dtype", default=dtype_default, choices=DTYPES,
                   help="weights" if dtype_default else "sets model.dtype and the matching mixed precision")  # fmt: skip
    p.add_argument("--attention", default="auto" if dtype_default else None,
                   help="auto, flash, efficient, cudnn, math or a diffusers backend")  # fmt: skip
    if offload:
        p.add_argument("--offload", default="none", choices=list(OFFLOAD),
                       help="small GPUs: whole components (model), groups of transformer blocks (blocks) or "
                            "layers (sequential) wait on the CPU between uses")  # fmt: skip
        p.add_argument("--offload-blocks", type=int, default=1, metavar="N",
                       help="--offload blocks: blocks moved at once (1: the next block is prefetched on CUDA)")  # fmt: skip
    if dtype_default:  # training and caching: model.quantize and hardware.compile in the config
        p.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                       choices=list(COMPILE_MODES),
                       help="torch.compile each repeated block of the denoiser (the first image pays the compile); "
                            "MODE: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs")  # fmt: skip
        p.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                       help="the denoiser's weights: fp8 storage, int8 (torchao), qint8 (quanto), nf4 (CUDA); "
                            "fp8dq (torchao float8 weights and activations, CUDA >= 8.9) and int8dq (int8 weights "
                            "and activations): speed options for generation")  # fmt: skip


def from_arguments(args: argparse.Namespace) -> Runtime:
    """The Runtime a command's flags describe, resolved and checked."""
    return resolve(args.device, args.dtype, args.attention, getattr(args, "offload", "none"),
                   quantize=getattr(args, "quantize", "none"), offload_blocks=getattr(args, "offload_blocks", 1),
                   compile_on=getattr(args, "compile", False))  # fmt: skip


def config_overrides(args: argparse.Namespace) -> list[str]:
    """--device / --dtype / --attention of `train` and `cache` as the config keys they stand for (given
    last, so they win over the config's own)."""
    out = []
    if args.device:
        out.append(f"hardware.device={args.device}")
    if args.dtype:
        out += [f"model.dtype={args.dtype}", f"hardware.mixed_precision={MIXED_PRECISION[args.dtype]}"]
    if args.attention:
        out.append(f"hardware.attention_backend={args.attention}")
    return out
