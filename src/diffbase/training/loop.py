"""The one training loop, on accelerate, for every method and family.

Reads top to bottom: `set_up` (the method prepares the backbone, optimizer, schedule, EMA, accelerate),
`resume`, then for each optimizer step `step` (the method's loss, backward, clip, step), `log`, and every
`logging.read_every` steps `read_back`, then `save` and `validate`. A method (diffbase.methods) differs only by
the functions it registers; this loop calls `method.prepare`, `method.loss` and `method.validate` and nothing
method-specific.

No host read on the hot path: a step's loss, loss terms and grad norm stay on the device until `read_back` reads
the steps since the last read in one transfer (every `logging.read_every` steps, and before anything acts on the
step count: a checkpoint, validation, an export, the end, a stop, and on a failure). Where the optimizer can skip a
step on the device (`device_skip`: torch's fused AdamW), a non-finite loss skips the update there and the host
learns of it at the read; elsewhere the step reads the flag at once, as before.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffbase.attention import apply_attention, choose
from diffbase.config import Config, ScheduleConfig, dump_yaml
from diffbase.errors import Stopped, UserError
from diffbase.io import write_text_atomic
from diffbase.models import backbone as B
from diffbase.models.placement import encoders_on, resolve_device
from diffbase.training import checkpoint as ckpt
from diffbase.training import sharding
from diffbase.training.optimizers import averaged_weights, make_optimizer, schedule_free, set_mode, skips_on_device
from diffbase.training.schedule import make_scheduler
from diffbase.training.seam import Method, Trained


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # this process's steps (after a resume: since it)
    all_losses: list[float] = field(default_factory=list)  # every step of the run, across resumes
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # perf_counter() when each step was queued (benchmarks)
    skipped_nonfinite: int = 0
    checkpoint: Path | None = None
    output_dir: Path | None = None
    finished: bool = False  # reached the planned number of steps (not stopped early)
    backbone: Any = None
    trained: Trained | None = None  # the method's modules, for export
    ema: Any = None  # diffusers' EMAModel when training.ema is on: validation and export use its weights
    optimizer: Any = None  # the (accelerate-wrapped) optimizer, left in eval mode at the end (schedule-free)


STOP_SIGNALS = {signal.SIGTERM: ("SIGTERM", 143), signal.SIGINT: ("SIGINT", 130)}


@dataclass
class StopRequest:
    """Set by SIGTERM (what Slurm and Kubernetes send before a kill) or SIGINT: the loop finishes its
    step, saves a checkpoint and stops."""

    name: str | None = None
    exit_code: int = 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT ask the loop to stop after its step; a second Ctrl-C stops at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        if request.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.name, request.exit_code = STOP_SIGNALS[signum]
        print(f"\n{request.name}: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)",
              file=sys.stderr)  # fmt: skip

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class Pending:
    """One optimizer step whose numbers are still on the device (read by `read_back`)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    finite: torch.Tensor | None  # on the device (device_skip); None: known finite on the host already
    lr: float  # the rate the step used
    time: float  # perf_counter() when the host had queued it


@dataclass
class Run:
    """Everything one training run holds while it loops."""

    config: Config
    method: Method
    bb: B.Backbone
    accelerator: Any
    trained: Trained
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    steps: int
    cache: Any = None
    export: Any = None  # export(trained, ema, step): the method's files for users, written during the run
    progress: ckpt.Progress = field(default_factory=ckpt.Progress)
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    stop: StopRequest = field(default_factory=StopRequest)
    device_skip: bool = False  # non-finite losses skip the update on the device (see `device_skip`)
    pending: list[Pending] = field(default_factory=list)  # steps since the last read
    schedule_mark: dict[str, Any] | None = None  # the schedule's state at the last read (device_skip)
    shown: tuple[float, float] | None = None  # the last loss and lr read, for the progress bar


def encode_batch(
    bb: B.Backbone, batch: dict[str, Any], cache: Any | None, keep: tuple[str, ...] = ()
) -> tuple[dict[str, Any], B.Cond]:
    """Posterior (mean, std) and text conditioning of a batch: from the cache where it has them,
    computed now otherwise. The batch entries named in `keep` (the method's: a loss mask, a control image)
    come along on the compute device: CUDA autocast leaves CPU tensors alone."""
    mean, std, cond = cache.lookup(batch) if cache is not None else (None, None, None)
    if mean is None or cond is None:
        with encoders_on(bb):  # a no-op unless offload parked them on the CPU
            if mean is None:
                mean, std = B.encode_distribution(bb, batch["pixels"])
            if cond is None:
                cond = B.encode_prompts(bb, batch["caption"], image_hw=tuple(batch["size"]))
    out = {"mean": mean.float().to(bb.device), "std": std.float().to(bb.device), "index": batch["index"]}
    for key in keep:
        if batch.get(key) is not None:
            out[key] = batch[key].to(bb.device)
    return out, cond


def read_batch(dataset: Any, indices: list[int]) -> dict[str, Any]:
    """Items collated into a batch."""
    return dataset.collate([dataset[i] for i in indices])


def on_cpu(config: Config) -> bool:
    return resolve_device(config.hardware.device, "hardware.device").type == "cpu"


def process_state(config: Config) -> Any:
    """accelerate's process state. Made with the same `cpu` flag as the Accelerator, since the first
    one made wins: without it, processes started by torchrun on CPUs would each train alone."""
    from accelerate import PartialState

    if sharding.deepspeed_on_cpu(on_cpu(config)):
        return sharding.deepspeed_cpu_state()
    return PartialState(cpu=on_cpu(config))


def total_steps(config: Config, batches_per_epoch: int) -> int:
    t = config.training
    if t.max_steps is not None:
        return t.max_steps
    return max(1, t.epochs * math.ceil(batches_per_epoch / t.gradient_accumulation))


def make_accelerator(config: Config) -> Any:
    """A fresh Accelerator: several runs in one process (tests, the demo, notebooks) each get their own
    precision and accumulation settings; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    cpu = on_cpu(config)
    accelerator = Accelerator(
        mixed_precision=config.hardware.mixed_precision,
        gradient_accumulation_steps=config.training.gradient_accumulation,
        cpu=cpu and not sharding.deepspeed_on_cpu(cpu),  # DeepSpeed on CPUs takes the GPU path (process_state)
    )
    sharding.enable_on_cpu(accelerator)  # FSDP asked for by the launcher: accelerate itself enables it on GPUs only
    return accelerator


def check_trainable(config: Config, bb: B.Backbone, trained: Trained) -> None:
    """What trains must be full precision: a method that trains the base's own weights needs an unquantized base.
    (Adapters peft made beside fp8-stored layers start in fp8; they train in fp32, cast below.)"""
    if config.model.quantize == "none":
        return
    from diffbase.models.quantize import frozen_in_fewer_bits

    quantized = set().union(*(frozen_in_fewer_bits(m) for m in [*bb.pipe.components.values()]
                              if isinstance(m, torch.nn.Module)))  # fmt: skip
    if any(id(p) in quantized for p in trained.trainable):
        raise UserError(f"model.quantize: training.method {config.training.method} trains the base's own weights, "
                        "which would be quantized; set model.quantize: none, or train an adapter (lora)")  # fmt: skip


def set_up(config: Config, method: Method, bb: B.Backbone, batches_per_epoch: int, cache: Any) -> Run:
    """The method prepares the backbone; what trains gets an optimizer, schedule and EMA, and goes
    through accelerate (every trained module, so DDP/FSDP wrap each one)."""
    t, accelerator = config.training, make_accelerator(config)
    world = accelerator.num_processes
    if world > 1:
        accelerator.print(f"training on {world} processes ({accelerator.distributed_type.value})")
    sharding.check(accelerator, config)
    torch.manual_seed(config.experiment.seed)  # the same initial adapter weights in every process and run
    trained = method.prepare(bb, config)
    sharding.check_modules(accelerator, trained.modules, t.method)
    check_trainable(config, bb, trained)
    if config.hardware.mixed_precision != "no" or config.model.quantize != "none":  # what trains is kept in fp32;
        for p in trained.trainable:  # autocast runs the rest in half (a quantized base computes in model.dtype)
            p.data = p.data.float()
    if config.hardware.offload == "blocks":  # after the method froze the base and added what trains
        from diffbase.models.block_swap import attach_block_swap

        bb.adapters["block_swap"] = attach_block_swap(bb.denoiser, accelerator.device, config.hardware.keep_blocks)
    attention = choose(config.hardware.attention_backend, accelerator.device)
    apply_attention(attention, [bb.denoiser, *trained.modules.values()])
    if config.hardware.compile:  # after the adapters and processors are in the blocks, so they compile with them
        from diffbase.compile import compile_blocks, options

        count = compile_blocks(bb.denoiser, **options(config.hardware.compile))
        accelerator.print(f"hardware.compile: {count} blocks of {type(bb.denoiser).__name__} compiled")
    if world > 1 and not method.multi_process:
        raise UserError(f"training.method: {t.method} trains in one process for now (no gradient sync across {world})")
    for module in trained.modules.values():
        module.train()  # modules load in eval mode; LoRA dropout acts only in train mode
    steps = total_steps(config, batches_per_epoch)
    schedule = t.schedule
    if schedule.warmup_epochs > 0:  # in optimizer steps of this data and batch size
        per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation)
        schedule = replace(schedule, warmup_steps=max(1, round(schedule.warmup_epochs * per_epoch)))
    optimizer = make_optimizer(trained.trainable, config, trained.param_groups, schedule.warmup_steps)
    if schedule_free(config):  # its own schedule: the warm-up went to the optimizer, the lr stays constant
        accelerator.print(f"adamw_schedulefree: its own schedule (warm-up {schedule.warmup_steps} steps, then "
                          f"constant); training.schedule.type {schedule.type} is not used")  # fmt: skip
        schedule = ScheduleConfig(type="constant", warmup_steps=0)
    lr_scheduler = make_scheduler(optimizer, steps, t.learning_rate, schedule)
    ema = make_ema(config, trained.trainable)
    if world > 1 and trained.find_unused_parameters:  # else DDP waits for gradients that never come
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    if is_sharded(accelerator) and not sharding.is_fsdp(accelerator):  # DeepSpeed: prepare() gets no data loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    names = list(trained.modules)
    where = sharding.names(trained.modules, trained.trainable) if sharding.is_fsdp(accelerator) else None
    *prepared, optimizer = accelerator.prepare(*trained.modules.values(), optimizer)
    trained.calls = dict(zip(names, prepared, strict=True))
    if where is not None:  # FSDP2 made each trained parameter a new (DTensor) one
        trained.trainable = sharding.reparent(trained.calls, where)
    if "denoiser" in trained.calls:  # the backbone's own denoiser is called through its wrapper
        bb.forward = trained.calls["denoiser"]
    run = Run(config, method, bb, accelerator, trained, optimizer, lr_scheduler, ema, steps, cache)
    run.device_skip = device_skip(config, accelerator, optimizer, ema)
    return run


def device_skip(config: Config, accelerator: Any, optimizer: Any, ema: Any) -> bool:
    """Whether a non-finite loss skips the update on the device, with no host read in the step: the optimizer
    skips a step itself when told so on the device (`skips_on_device`: torch's fused AdamW, the default `adamw`),
    and nothing else must know at once. Not with gradient accumulation (a non-finite micro-batch is left out of
    the sum, the others kept), EMA (it advances on taken steps only), fp16's GradScaler (it sets the optimizer's
    skip flag itself) or FSDP / DeepSpeed (their own optimizer steps). Elsewhere the step reads the flag: one host
    read per micro-batch (8-bit AdamW, Lion, Prodigy, Adafactor, schedule-free AdamW, `optimizer.fused: false`)."""
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    return (skips_on_device(optimizer) and config.training.gradient_accumulation == 1 and ema is None
            and getattr(accelerator, "scaler", None) is None and accelerator.distributed_type in plain)  # fmt: skip


def make_ema(config: Config, params: list[torch.nn.Parameter]) -> Any:
    """diffusers' EMAModel over what trains (None when off), its warm-up counted in EMA updates: until
    `start_step` the average is a copy of the weights."""
    e = config.training.ema
    if not e.enabled:
        return None
    check_ema(config)
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=e.decay, update_after_step=e.start_step // e.update_every)


def check_ema(config: Config) -> None:
    """training.ema's numbers, checked before anything loads (train) and again where the EMA is made."""
    e = config.training.ema
    if e.enabled and (e.update_every < 1 or e.start_step < 0 or not 0.0 < e.decay < 1.0):
        raise UserError(f"training.ema: expected decay in (0, 1), update_every >= 1 and start_step >= 0, got "
                        f"{e.decay}, {e.update_every}, {e.start_step}")  # fmt: skip


@contextlib.contextmanager
def ema_weights(ema: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The EMA's weights in the trained modules for the duration (validation, export), the trained ones back
    after; a no-op without EMA."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def resume(run: Run, root: Path, resume_arg: str | None) -> None:
    """Weights, optimizer, schedule, EMA, RNG and data position from a checkpoint folder."""
    found = ckpt.resolve_resume(root, resume_arg)
    if found is None:
        return
    try:
        run.progress, tensors, objects = ckpt.load_checkpoint(found)
        if (found / "accelerate_state").is_dir():  # saved by DeepSpeed: weights and optimizer
            if not is_sharded(run.accelerator) or sharding.is_fsdp(run.accelerator):
                raise UserError(f"--resume: {found} was saved by DeepSpeed, whose optimizer state is one file per "
                                "process; resume it with the same DeepSpeed launch (accelerate launch --config_file "
                                "configs/accelerate/deepspeed_zero2.yaml) and number of processes")  # fmt: skip
            run.accelerator.load_state(str(found / "accelerate_state"))
        elif sharding.is_fsdp(run.accelerator):  # whole tensors, cut into this process's shards
            with sharding.loading_whole(list(run.trained.calls.values())):
                load_trained_state_dict(run.trained, tensors)
            sharding.load_optimizer_state(run.optimizer, objects["optimizer"])
        else:
            load_trained_state_dict(run.trained, tensors)
            run.optimizer.load_state_dict(objects["optimizer"])
        run.lr_scheduler.load_state_dict(objects["lr_scheduler"])
        if run.ema is not None and "ema" in tensors:
            run.ema.load_state_dict({"shadow_params": list(tensors["ema"].values()), **objects["ema_meta"]})
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # intact, but of another config
        if isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate" in str(exc)):
            raise  # memory, not the config: train() says so
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--resume: {found} does not fit this config ({reason[:200]})") from None
    run.accelerator.print(f"resumed from {found} at step {run.progress.step}")


def trained_state_dict(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """What a checkpoint keeps: the method's choice (LoRA layers, the parameters that train), else every
    trained module whole. `full`: the gathered state dicts of sharded modules (FSDP, DeepSpeed)."""
    if trained.state_dict is not None:
        return trained.state_dict(trained, full)
    return {
        name: {k: v.detach() for k, v in (full[name] if full else module.state_dict()).items()}
        for name, module in trained.modules.items()
    }


def load_trained_state_dict(trained: Trained, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    if trained.load_state_dict is not None:
        return trained.load_state_dict(trained, tensors)
    for name, module in trained.modules.items():
        module.load_state_dict(tensors[name])


def batch_for(run: Run, dataset: Any, indices: list[int]) -> dict[str, Any]:
    """This process's share of one global batch."""
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    per_rank = len(indices) // world
    local = indices[rank * per_rank : (rank + 1) * per_rank] if world > 1 else indices
    return read_batch(dataset, local)


def step(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool | torch.Tensor]:
    """One micro-batch: the method's loss, then backward, clip and optimizer step when gradients sync.
    A non-finite loss (in any process: the flag is all-reduced, a device op) skips the update everywhere. With
    `run.device_skip` the flag goes to the optimizer as its `found_inf` and the fused kernel skips the update on
    the device (backward runs anyway; its gradients are dropped): the flag is returned as a device tensor, for
    `read_back`. Otherwise it is read here (one host read) and the step is not taken, as before."""
    acc, t = run.accelerator, run.config.training
    with acc.accumulate(*run.trained.calls.values()), acc.autocast():
        loss, logs = run.method.loss(run.config, run.bb, run.trained, batch, run.cache, run.progress.step)
        finite = torch.isfinite(loss).all()
        if acc.num_processes > 1:  # every process must agree to skip, or DDP hangs
            finite = acc.reduce(finite.float(), reduction="min") > 0
        if run.device_skip:
            optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # the fused AdamW inside accelerate's
            optimizer.found_inf = (~finite).float()  # 0-d float32, 1.0 skips: GradScaler's protocol
        else:
            finite = bool(finite)  # the host read of the path without device skipping
        if run.device_skip or finite:
            acc.backward(loss)
            if acc.sync_gradients:  # an infinite bound measures the norm without clipping
                norm = acc.clip_grad_norm_(run.trained.trainable, t.max_grad_norm or math.inf)
                run.grad_norm = torch.tensor(float(norm)) if isinstance(norm, float) else norm  # DeepSpeed: a float
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, logs, finite


def count_nonfinite(run: Run, result: TrainResult, metrics: Any = None) -> None:
    """A step not taken for a non-finite loss; training.max_nonfinite_steps of them in a row stop the run (the
    steps before still read, averaged: every process is here, at the same step)."""
    p, t = run.progress, run.config.training
    p.nonfinite_total += 1
    p.nonfinite_in_row += 1
    result.skipped_nonfinite += 1
    if p.nonfinite_in_row >= t.max_nonfinite_steps:
        if metrics is not None:
            read_back(run, metrics, result)
        raise UserError(
            f"training: {p.nonfinite_in_row} non-finite losses in a row at step {p.step}; "
            "lower training.learning_rate or check the data"
        )


def log(run: Run, loss: torch.Tensor, logs: dict[str, torch.Tensor], finite: bool | torch.Tensor) -> None:
    """After an optimizer step: schedule and EMA advance and the step is counted; its loss, grad norm and the
    method's own loss terms wait on the device for `read_back`, which writes them to metrics.jsonl and the
    trackers of logging.report_to. With `device_skip` the host does not know yet whether the step was taken: it
    counts it, and `read_back` takes back the skipped ones (the count, and the schedule from the last read on)."""
    if run.device_skip and not run.pending:  # a window starts: the schedule's state to go back to
        run.schedule_mark = copy.deepcopy(run.lr_scheduler.state_dict())
    lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
    run.lr_scheduler.step()
    run.progress.step += 1
    if run.ema is not None and run.progress.step % run.config.training.ema.update_every == 0:
        run.ema.step(run.trained.trainable)
    terms = {k: v.detach() for k, v in logs.items()}
    flag = finite if isinstance(finite, torch.Tensor) else None
    run.pending.append(Pending(loss.detach(), terms, run.grad_norm, flag, lr, time.perf_counter()))


def read_back(run: Run, metrics: Any, result: TrainResult, collective: bool = True, failing: bool = False) -> bool:
    """The steps since the last read, in one host read (and one all-reduce of their losses and terms, averaged over
    processes): each step's row in metrics.jsonl and the trackers, in order, and `result.losses`. Steps skipped on
    the device are found here: each is counted by the training.max_nonfinite_steps rule (which may stop the run
    here) and taken back from the step count and the schedule, so both are what the host would have counted
    knowing at once. True when the last step read was taken (the loop then acts on the count).

    `collective=False` (a failure: another process may be the one that failed): no all-reduce, this process's own
    numbers. `failing`: skipped steps are counted, the rule is not applied (an error is already on its way)."""
    pending, run.pending = run.pending, []
    if not pending:
        return False
    acc, p = run.accelerator, run.progress
    device = pending[0].loss.device
    averaged = [v.float().to(device) for rec in pending for v in (rec.loss, *rec.terms.values())]
    shared = torch.stack(averaged)
    if collective and acc.num_processes > 1:
        shared = acc.reduce(shared, reduction="mean")
    nan, one = torch.full((), math.nan, device=device), torch.ones((), device=device)
    own = torch.stack([x.float().to(device) for rec in pending for x in (
        nan if rec.grad_norm is None else rec.grad_norm, one if rec.finite is None else rec.finite)])  # fmt: skip
    values = torch.cat([shared, own]).tolist()  # the host read
    means, flags = iter(values[: len(averaged)]), iter(values[len(averaged) :])
    base = p.step - len(pending)
    p.step = base  # counted again below: the steps taken
    for rec in pending:
        value, terms = next(means), {k: next(means) for k in rec.terms}
        grad_norm, taken = next(flags), next(flags) > 0
        if not taken:  # skipped on the device
            if failing:
                p.nonfinite_total, result.skipped_nonfinite = p.nonfinite_total + 1, result.skipped_nonfinite + 1
            else:
                count_nonfinite(run, result)
            continue
        if rec.finite is not None:
            p.nonfinite_in_row = 0
        p.step += 1
        result.losses.append(value)
        result.step_times.append(rec.time)
        metrics.scalars(p.step, loss=value, lr=rec.lr, grad_norm=grad_norm, **terms)
        run.shown = value, rec.lr
    if p.step != base + len(pending):
        rewind_schedule(run, p.step - base)
    return taken


def rewind_schedule(run: Run, taken: int) -> None:
    """The schedule as if only the `taken` steps since the last read had stepped it (the skipped ones did too,
    unknown to the host): back to its state there, then stepped once per taken step."""
    scheduler = run.lr_scheduler
    scheduler.load_state_dict(copy.deepcopy(run.schedule_mark))
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    for _ in range(taken):
        scheduler.step()


def read_on_failure(run: Run, metrics: Any, result: TrainResult) -> None:
    """What was computed before a failure still reaches metrics.jsonl: the steps since the last read, read without
    a collective and without the non-finite rule (see `read_back`); a device that cannot be read any more loses
    them."""
    with contextlib.suppress(Exception):
        read_back(run, metrics, result, collective=False, failing=True)


def run_training(
    config: Config,
    method: Method,
    bb: B.Backbone,
    dataset: Any,
    sampler: Any,
    resume_arg: str | None = None,
    cache: Any | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
    validation: tuple[Any, Any] = (None, None),
    export: Any = None,
) -> TrainResult:
    """Train `bb` with `method` on `dataset` batched by `sampler` (index lists of one global batch each).

    `validation` is the held-out dataset (or None) and its cache. `export(trained, ema, step)` writes the method's
    files every `training.export_every` steps. `stop_after` ends the run early after that many optimizer steps (as
    if it crashed), for tests.
    """
    from tqdm import tqdm

    from diffbase.training.metrics import MetricsLog

    out_dir = Path(config.experiment.output_dir)
    run = set_up(config, method, bb, len(sampler), cache)
    run.export = export
    set_checkpointing(run, lambda: probe_step(run, batch_for(run, dataset, next(iter(sampler)))))
    resume(run, out_dir / "checkpoints", resume_arg)
    acc, progress = run.accelerator, run.progress
    result = begin(run, out_dir)
    metrics = MetricsLog(out_dir, enabled=acc.is_main_process, resume_step=progress.step, config=config)
    bar = tqdm(total=run.steps, initial=progress.step, desc=f"train {config.training.method}", unit="step",
               disable=not (show_progress and acc.is_main_process), dynamic_ncols=True)  # fmt: skip
    start, first_step = time.perf_counter(), progress.step
    outcome = "failed"  # what the trackers' runs are marked, unless the loop ends
    try:
        with stop_on_signals() as run.stop:
            try:
                while progress.step < run.steps:
                    if epoch(run, dataset, sampler, metrics, result, bar, (start, first_step, stop_after), validation):
                        break
            except BaseException:
                read_on_failure(run, metrics, result)
                raise
        metrics.plot()
        outcome = "finished"
    except Stopped:
        outcome = "killed"
        metrics.plot()
        raise
    finally:
        bar.close()  # a stopping message goes on a line of its own
        metrics.close(outcome)
        vars(getattr(run.optimizer, "optimizer", run.optimizer)).pop("found_inf", None)  # step() as usual after
    return finish(run, bb, metrics, result)


def finish(run: Run, bb: B.Backbone, metrics: Any, result: TrainResult) -> TrainResult:
    """The result of a loop that ended: the averaged weights of a schedule-free optimizer in place, every loss."""
    if run.progress.step >= run.steps:
        set_mode(run.optimizer, "eval")  # a schedule-free optimizer's averaged weights are the result to export
    result.all_losses = metrics.losses() if run.accelerator.is_main_process else result.losses
    bb.forward = None
    result.steps = run.progress.step
    result.finished = run.progress.step >= run.steps
    return result


def begin(run: Run, out_dir: Path) -> TrainResult:
    """The run's record once its set-up succeeded (a config error leaves nothing): config.yaml, and the result
    that collects what the loop does; says when EMA weights are what validation and export use."""
    config = run.config
    if run.accelerator.is_main_process:
        write_text_atomic(out_dir / "config.yaml", dump_yaml(config))
    if run.ema is not None:
        e = config.training.ema
        run.accelerator.print(f"EMA on (decay {e.decay:g}, every {e.update_every} step(s) from step {e.start_step}): "
                              "validation and the exports use the EMA weights")  # fmt: skip
    return TrainResult(steps=run.progress.step, output_dir=out_dir, backbone=run.bb, trained=run.trained, ema=run.ema,
                       optimizer=run.optimizer)  # fmt: skip


def epoch(
    run: Run, dataset: Any, sampler: Any, metrics: Any, result: TrainResult, bar: Any, clock: tuple, validation: tuple
) -> bool:
    """The rest of the current epoch; True when the run is done (all steps, or `stop_after`)."""
    progress, start, first_step, stop_after = run.progress, *clock
    sampler.set_epoch(progress.epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(progress.epoch)
    batches = list(sampler)
    tried = read = 0
    for b_index in range(progress.batch_in_epoch, len(batches)):
        batch = batch_for(run, dataset, batches[b_index])
        progress.batch_in_epoch = b_index + 1
        tried += 1
        if not batch["index"]:  # every file of this batch failed to load (reported at the end)
            continue
        read += 1
        loss, logs, finite = step(run, batch)
        if not run.accelerator.sync_gradients:
            continue
        if not run.device_skip:  # known on the host already
            if not finite:
                count_nonfinite(run, result, metrics)
                continue
            progress.nonfinite_in_row = 0
        log(run, loss, logs, finite)
        ckpt.hold_for_test("step", progress.step)
        bar.update(1)
        due = len(run.pending) >= run.config.logging.read_every or any(acts(run, first_step, stop_after))
        if not due and not (run.accelerator.num_processes == 1 and run.stop.name is not None):  # else asked at reads
            continue  # nothing acts on this step: its numbers stay on the device
        if not read_back(run, metrics, result):
            continue  # the last step was skipped on the device: the count went back, nothing is due
        show(run, bar, progress.step - first_step, start)
        done, checkpointing, exporting, validating = acts(run, first_step, stop_after)
        saved = None
        if checkpointing:
            result.checkpoint = saved = save(run, Path(run.config.experiment.output_dir) / "checkpoints")
        if validating:
            validate(run, dataset, validation, metrics, result)
        if exporting:
            export_now(run)
        if done:
            return True
        if stop_requested(run):
            result.checkpoint = saved or save(run, Path(run.config.experiment.output_dir) / "checkpoints")
            raise Stopped(
                f"stopped by {run.stop.name or 'a signal'} after step {progress.step}: saved {result.checkpoint}; "
                "continue with the same command and --resume latest", run.stop.exit_code or 143
            )  # fmt: skip
    if tried and not read:
        raise UserError(f"data: no image could be read in epoch {progress.epoch + 1}; {unreadable(dataset)}")
    progress.epoch += 1
    progress.batch_in_epoch = 0
    return False


def acts(run: Run, first_step: int, stop_after: int | None) -> tuple[bool, bool, bool, bool]:
    """What the loop does at this step count: (done, checkpoint, export, validation)."""
    step_no, t = run.progress.step, run.config.training
    done = step_no >= run.steps or (stop_after is not None and step_no - first_step >= stop_after)
    checkpointing = done or bool(t.checkpoint_every and step_no % t.checkpoint_every == 0)
    exporting = not done and run.export is not None and bool(t.export_every and step_no % t.export_every == 0)
    validating = done or exporting or bool(t.validation.every and step_no % t.validation.every == 0)
    return done, checkpointing, exporting, validating


def show(run: Run, bar: Any, steps: int, start: float) -> None:
    """The progress bar at a read: the count as read, and the last loss and lr read (they lag the steps queued
    since by less than logging.read_every)."""
    rate = steps / max(time.perf_counter() - start, 1e-9)
    if bar.n != run.progress.step:  # steps skipped on the device were counted until this read
        bar.n = run.progress.step
    if run.shown is not None:
        bar.set_postfix(loss=f"{run.shown[0]:.4f}", lr=f"{run.shown[1]:.2e}", it_s=f"{rate:.2f}")
    else:
        bar.refresh()


def stop_requested(run: Run) -> bool:
    """Whether a stop was asked for, in any process (all stop after the same step: under several processes the
    loop asks only after a read, which all make at the same step, so the collective is no host read per step)."""
    asked = run.stop.name is not None
    if run.accelerator.num_processes > 1:
        flag = torch.tensor(float(asked), device=run.accelerator.device)
        asked = bool(run.accelerator.reduce(flag, reduction="max") > 0)
    return asked


def unreadable(dataset: Any) -> str:
    """What failed to load, for the message of an epoch with no readable batch."""
    files = dataset.report.files
    if not files:
        return "check data.train_path"
    path, reason = files[0]
    return f"{len(files)} file(s) failed, first {path}: {reason}; restore them or fix data.train_path"


def probe_step(run: Run, batch: dict[str, Any]) -> None:
    """Forward and backward of the first batch, gradients dropped: what `auto` checkpointing measures."""
    with run.accelerator.autocast():
        loss, _ = run.method.loss(run.config, run.bb, run.trained, batch, run.cache, 0)
    run.accelerator.backward(loss)
    run.optimizer.zero_grad(set_to_none=True)


def set_checkpointing(run: Run, probe: Any) -> None:
    """hardware.gradient_checkpointing: true, false, or auto (measured by one probe step on a GPU)."""
    from diffbase.training.memory import probe_needs_checkpointing

    acc, setting = run.accelerator, run.config.hardware.gradient_checkpointing
    swap = run.config.hardware.offload == "blocks"
    if swap:  # a swapped block's weights come back for its recompute: always on (train() refused `false`)
        setting = True
    on = setting is True
    if setting == "auto":
        on, why = probe_needs_checkpointing(probe, acc.device)
        if acc.num_processes > 1:  # every process makes the same choice
            on = bool(acc.reduce(torch.tensor(float(on), device=acc.device), reduction="max") > 0)
        acc.print(f"gradient checkpointing: {why}")
    if on and run.trained.checkpointing is not None:
        run.trained.checkpointing()
    elif on:  # with block swap the denoiser too, whether it trains or only carries the method's adapters
        for module in [*run.trained.modules.values(), *([run.bb.denoiser] if swap else [])]:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()


def validate(run: Run, dataset: Any, validation: tuple[Any, Any], metrics: Any, result: TrainResult) -> None:
    """The method's validation (images, held-out numbers), computed by the main process while the
    others wait, under autocast as diffusers' scripts validate (fp32 trained weights beside a half base)."""
    from diffbase.io import save_png_atomic

    acc, config, step_no = run.accelerator, run.config, run.progress.step
    acc.wait_for_everyone()
    if acc.is_main_process and is_sharded(acc):  # a forward in one process alone would wait for the others' shards
        if config.training.validation.prompts or validation[0] is not None:
            acc.print("validation: skipped, the model is sharded across processes (FSDP/DeepSpeed)")
    elif acc.is_main_process:
        # the encoders come back from the CPU (parked there after caching) for validations that encode
        with acc.autocast(), averaged_weights(run.optimizer), ema_weights(run.ema, run.trained.trainable), \
                encoders_on(run.bb):  # fmt: skip
            out = run.method.validate(config, run.bb, run.trained, dataset, validation)
        if out.grid is not None:
            save_png_atomic(out.grid, Path(config.experiment.output_dir) / "validation" / f"step-{step_no:06d}.png")
            metrics.image(step_no, "validation", out.grid)
        if "val_loss" in out.metrics:
            result.val_losses.append((step_no, out.metrics["val_loss"]))
        if out.metrics:
            metrics.scalars(step_no, **out.metrics)  # one row per check
    acc.wait_for_everyone()


def export_now(run: Run) -> None:
    """The method's files at this step (training.export_every), written by the main process while the others wait."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if sharding.is_fsdp(acc):  # every process gathers, the main one writes
        with sharding.full_weights(list(run.trained.calls.values()), trainable_only=False, main=acc.is_main_process):
            if acc.is_main_process:
                run.export(run.trained, run.ema, run.progress.step)
    elif acc.is_main_process and is_sharded(acc):
        acc.print("export: skipped during the run, the model is sharded across processes (DeepSpeed)")
    elif acc.is_main_process:
        with averaged_weights(run.optimizer):
            run.export(run.trained, run.ema, run.progress.step)
    acc.wait_for_everyone()


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save(run: Run, root: Path) -> Path:
    """Checkpoint after every process reached the same step. Under DDP the main process has all it
    needs. Under FSDP every process takes part: the trained weights and the optimizer state are gathered whole to the
    main process, which writes the files an unsharded run writes (so any number of processes resumes them). Under
    DeepSpeed the trained weights are gathered to the main process, and accelerate writes the sharded optimizer state,
    which is moved in."""
    acc, progress = run.accelerator, run.progress
    acc.wait_for_everyone()
    if sharding.is_fsdp(acc):
        return save_fsdp(run, root)
    folders, full = {}, None
    if is_sharded(acc):
        full = {name: acc.get_state_dict(module) for name, module in run.trained.calls.items()}
        shards = root / f".tmp-optimizer-{progress.step:06d}"
        acc.save_state(str(shards))
        acc.wait_for_everyone()  # every process has written its files before the main one moves the folder
        folders["accelerate_state"] = shards
    if acc.is_main_process:
        tensors = trained_state_dict(run.trained, full)
        objects = {"lr_scheduler": run.lr_scheduler.state_dict()}
        if not folders:
            objects["optimizer"] = run.optimizer.state_dict()
        if run.ema is not None:
            state = run.ema.state_dict()
            tensors["ema"] = {f"{i:05d}": p for i, p in enumerate(state.pop("shadow_params"))}
            objects["ema_meta"] = state
        ckpt.save_checkpoint(root, progress, tensors, objects, run.config.training.keep_checkpoints, folders)
    acc.wait_for_everyone()
    return root / f"step-{progress.step:06d}"


def save_fsdp(run: Run, root: Path) -> Path:
    """`save` under FSDP: the trained parameters and the optimizer state gathered whole to the main process."""
    acc, progress = run.accelerator, run.progress
    main = acc.is_main_process
    with sharding.full_weights(list(run.trained.calls.values()), trainable_only=True, main=main):
        tensors = trained_state_dict(run.trained) if main else {}
    optimizer = sharding.full_optimizer_state(run.optimizer, main)
    if main:
        sharded = sharding.leftover(tensors)
        if sharded:
            raise RuntimeError(f"FSDP checkpoint: {sharded[:3]} are frozen weights in the method's state_dict")
        objects = {"lr_scheduler": run.lr_scheduler.state_dict(), "optimizer": optimizer}
        ckpt.save_checkpoint(root, progress, tensors, objects, run.config.training.keep_checkpoints)
    acc.wait_for_everyone()
    return root / f"step-{progress.step:06d}"
