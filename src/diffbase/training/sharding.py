"""FSDP2 (accelerate's `fsdp_version: 2`, torch's `fully_shard`) in the one loop, and DeepSpeed on CPU processes.

accelerate turns FSDP on for accelerator devices only: on CPU processes (gloo) it drops the plugin and trains with
DDP. `enable_on_cpu` makes the same state change accelerate makes on GPUs, when the launcher asked for FSDP
(`accelerate launch --config_file configs/accelerate/fsdp.yaml`, which sets ACCELERATE_USE_FSDP and the FSDP_*
variables), so the CPU tests run the code path a GPU run takes.

Under FSDP2 every parameter of a trained module is a DTensor holding this process's shard. What the loop needs from
that: the trained parameters after sharding (`reparent`), whole weights while a checkpoint or an export is written
(`full_weights`: the method's own state_dict and export functions then see plain tensors, as in one process), whole
tensors loaded into the shards (`loading_whole`, under the method's own load_state_dict), and the optimizer's state
gathered into the layout of an unsharded optimizer (`full_optimizer_state`, `load_optimizer_state`). A checkpoint saved under FSDP is therefore the same files
as one saved by one process or by DDP, and resumes in any of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from diffbase.errors import UserError

REQUESTED = "ACCELERATE_USE_FSDP"  # what `accelerate launch` sets for a config with distributed_type: FSDP
DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"  # ... and for distributed_type: DEEPSPEED


def requested() -> bool:
    return os.environ.get(REQUESTED, "false").lower() == "true"


def deepspeed_on_cpu(cpu: bool) -> bool:
    """DeepSpeed asked for by the launcher, on CPU processes. accelerate never picks DeepSpeed when told `cpu=True`,
    and with `cpu=False` on a machine without an accelerator it finds no process-group backend and makes every
    process rank 0 of 1. DeepSpeed itself runs on CPUs (its `cpu` accelerator, over gloo): `process_state` then asks
    accelerate for gloo by name and the CPU as the device, and `cpu=False`, the path a GPU run takes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cpu and world > 1 and os.environ.get(DEEPSPEED, "false").lower() == "true"


def deepspeed_cpu_state() -> Any:
    """accelerate's process state for DeepSpeed on CPU processes (see `deepspeed_on_cpu`)."""
    from accelerate import PartialState

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported: before accelerate imports it
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    return PartialState(cpu=False, backend="gloo")


def enable_on_cpu(accelerator: Any) -> None:
    """FSDP on CPU processes, when the launcher asked for it: accelerate's plugin from the FSDP_* variables, set on
    its state as AcceleratorState does for GPUs (and on the process state, which later AcceleratorStates copy)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu_processes = accelerator.device.type == "cpu" and accelerator.num_processes > 1
    if not requested() or not cpu_processes or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return  # (a second run in the process: the process state says FSDP already, the new plugin is set below)
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(f"FSDP on CPU processes: fsdp_version {plugin.fsdp_version}; set fsdp_version: 2 (FSDP2) in "
                        "the accelerate config (configs/accelerate/fsdp.yaml)")  # fmt: skip
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check(accelerator: Any, config: Any) -> None:
    """What the loop supports under FSDP: FSDP2 only, and no EMA (its copies would be of the unsharded weights)."""
    if not is_fsdp(accelerator):
        return
    if not accelerator.is_fsdp2:
        raise UserError("FSDP: diffbase trains with FSDP2; set fsdp_version: 2 in the accelerate config "
                        "(configs/accelerate/fsdp.yaml)")  # fmt: skip
    if config.training.ema.enabled:
        raise UserError("training.ema: not supported with FSDP yet; set training.ema.enabled=false, or train with "
                        "DDP (configs/accelerate/ddp.yaml)")  # fmt: skip


def check_modules(accelerator: Any, modules: dict[str, torch.nn.Module], method: str) -> None:
    """DeepSpeed wraps one module (accelerate hands it the last one prepared): a method training several is refused."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and len(modules) > 1:
        raise UserError(f"training.method {method}: trains {len(modules)} modules ({', '.join(modules)}) and DeepSpeed "
                        "trains one; use FSDP or DDP (configs/accelerate/fsdp.yaml, ddp.yaml)")  # fmt: skip


def names(modules: dict[str, torch.nn.Module], params: list[torch.nn.Parameter]) -> list[tuple[str, str]]:
    """Where each of `params` lives: (module name, parameter name), to find it again after sharding."""
    where: dict[int, tuple[str, str]] = {}
    for name, module in modules.items():
        for fqn, p in module.named_parameters():
            where.setdefault(id(p), (name, fqn))
    missing = [i for i, p in enumerate(params) if id(p) not in where]
    if missing:
        raise UserError(f"FSDP: {len(missing)} trained parameter(s) belong to no trained module, so FSDP cannot shard "
                        "them; train with DDP (configs/accelerate/ddp.yaml)")  # fmt: skip
    return [where[id(p)] for p in params]


def reparent(calls: dict[str, torch.nn.Module], where: list[tuple[str, str]]) -> list[torch.nn.Parameter]:
    """The trained parameters after sharding (fully_shard replaces each by a DTensor parameter), in their order."""
    found = {name: dict(module.named_parameters()) for name, module in calls.items()}
    return [found[name][fqn] for name, fqn in where]


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


@contextlib.contextmanager
def full_weights(modules: list[torch.nn.Module], *, trainable_only: bool, main: bool) -> Iterator[None]:
    """Each sharded parameter of `modules` (only those that train with `trainable_only`) replaced by a plain
    parameter holding its whole value, on the CPU, in the main process (`main`), for the duration: state_dict,
    save_pretrained and the methods' exports there see whole weights, as in one process. Every process must enter
    (each parameter is all-gathered); the others keep their shards. FSDP's state-dict hooks do nothing meanwhile: its
    parameter groups stay in their sharded state."""
    from torch.distributed.fsdp import FSDPModule

    dtensor = _dtensor()
    for module in modules:  # a group left unsharded after a forward (reshard_after_forward: false) is sharded again
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()
    swapped: list[tuple[torch.nn.Module, str, Any]] = []
    copies: dict[int, torch.nn.Parameter | None] = {}
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if not isinstance(p, dtensor) or (trainable_only and not p.requires_grad):
                        continue
                    if id(p) not in copies:
                        full = p.full_tensor()  # the all-gather, in the same order in every process
                        copies[id(p)] = torch.nn.Parameter(full.cpu(), p.requires_grad) if main else None
                    if main:
                        swapped.append((sub, name, p))
                        sub._parameters[name] = copies[id(p)]
    try:
        yield
    finally:
        for sub, name, original in swapped:
            sub._parameters[name] = original


@contextlib.contextmanager
def loading_whole(modules: list[torch.nn.Module]) -> Iterator[None]:
    """load_state_dict of whole (unsharded) tensors into the sharded `modules`, in every process: a pre-hook on each
    submodule hands its sharded parameters their tensors as replicated DTensors, which the copy cuts into this
    process's shard (no communication). It acts where the keys have met the parameters, so it works under any
    method's own load_state_dict (peft's key mapping included); buffers load as usual."""
    from torch.distributed.tensor import Replicate

    dtensor = _dtensor()

    def replicate(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, p in module._parameters.items():
            value = state_dict.get(prefix + name)
            if isinstance(p, dtensor) and torch.is_tensor(value) and not isinstance(value, dtensor):
                local = value.to(device=p.device, dtype=p.dtype)
                state_dict[prefix + name] = dtensor.from_local(local, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                                                               run_check=False)  # fmt: skip

    handles = [sub.register_load_state_dict_pre_hook(replicate) for module in modules for sub in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shard_like(full: torch.Tensor, like: Any) -> Any:
    """`full` cut as `like` (a DTensor) is: this process's shard, taken locally (every process holds `full`)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)  # fmt: skip


def full_optimizer_state(optimizer: Any, main: bool) -> dict[str, Any] | None:
    """The optimizer's state_dict with each sharded state tensor gathered whole (on the CPU, in the main process):
    the layout of an unsharded optimizer over the same parameters. Every process must call it; None outside main."""
    dtensor = _dtensor()
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied, not changed
    gathered = {}
    for index, per_param in state["state"].items():  # the same order in every process
        gathered[index] = {key: value.full_tensor().cpu() if isinstance(value, dtensor) else value
                           for key, value in per_param.items()}  # fmt: skip
    return {**state, "state": gathered} if main else None


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """An unsharded optimizer's state_dict (from any number of processes) into this sharded optimizer: each state
    tensor shaped like its parameter is cut into this process's shard."""
    dtensor = _dtensor()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_index = {}
    for index, per_param in state["state"].items():
        p = params[int(index)]
        per_index[index] = {
            key: shard_like(value, p) if isinstance(p, dtensor) and torch.is_tensor(value) and value.shape == p.shape
            else value
            for key, value in per_param.items()
        }  # fmt: skip
    optimizer.load_state_dict({**state, "state": per_index})


def leftover(tensors: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names of checkpoint tensors still sharded (a method keeping frozen weights): they cannot be written."""
    dtensor = _dtensor()
    return [f"{f}/{k}" for f, state in tensors.items() for k, v in state.items() if isinstance(v, dtensor)]
