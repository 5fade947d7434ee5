"""The one training loop, on accelerate, for every method and family.

Reads top to bottom: set up, resume, then for each optimizer step: encode (or read the cache),
loss, backward, clip, step, log, checkpoint, validate. Methods differ only through
`training.methods` (what trains) and `training.step` (the loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffbase.attention import apply_attention, choose
from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.models import backbone as B
from diffbase.models.placement import encoders_on, resolve_device
from diffbase.training import checkpoint as ckpt
from diffbase.training.methods import MethodState, load_trained_state_dict, prepare_method, trained_state_dict
from diffbase.training.schedule import make_scheduler
from diffbase.training.step import diffusion_step_loss


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # perf_counter() at the end of each step (benchmarks)
    skipped_nonfinite: int = 0
    checkpoint: Path | None = None
    output_dir: Path | None = None
    finished: bool = False  # reached the planned number of steps (not stopped early)
    backbone: Any = None


def make_optimizer(params: list[torch.nn.Parameter], config: Config) -> torch.optim.Optimizer:
    t = config.training
    o = t.optimizer
    if o.type == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "training.optimizer.type: adamw8bit needs bitsandbytes (pip install bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(
            params, lr=t.learning_rate, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
    return torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def encode_batch(bb: B.Backbone, batch: dict[str, Any], cache: Any | None) -> tuple[dict[str, Any], B.Cond]:
    """Posterior (mean, std) and text conditioning of a batch: from the cache where it has them,
    computed now otherwise."""
    mean, std, cond = cache.lookup(batch) if cache is not None else (None, None, None)
    if mean is None or cond is None:
        with encoders_on(bb):  # a no-op unless offload parked them on the CPU
            if mean is None:
                mean, std = B.encode_distribution(bb, batch["pixels"])
            if cond is None:
                cond = B.encode_prompts(bb, batch["caption"], image_hw=tuple(batch["size"]))
    out = {"mean": mean.float().to(bb.device), "std": std.float().to(bb.device), "index": batch["index"]}
    for key in ("mask", "control"):
        if batch.get(key) is not None:
            out[key] = batch[key]
    return out, cond


def read_batch(dataset: Any, indices: list[int], masked_loss: bool) -> dict[str, Any]:
    """Items collated into a batch; masks are kept only when the loss is masked."""
    batch = dataset.collate([dataset[i] for i in indices])
    if not masked_loss:
        batch.pop("mask", None)
    return batch


def on_cpu(config: Config) -> bool:
    return resolve_device(config.hardware.device, "hardware.device").type == "cpu"


def process_state(config: Config) -> Any:
    """accelerate's process state. Made with the same `cpu` flag as the Accelerator, since the first
    one made wins: without it, processes started by torchrun on CPUs would each train alone."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu(config))


def total_steps(config: Config, batches_per_epoch: int) -> int:
    t = config.training
    if t.max_steps is not None:
        return t.max_steps
    return max(1, t.epochs * math.ceil(batches_per_epoch / t.gradient_accumulation))


def run_training(
    config: Config,
    bb: B.Backbone,
    dataset: Any,
    sampler: Any,
    resume: str | None = None,
    cache: Any | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
    validation: tuple[Any, Any] = (None, None),
) -> TrainResult:
    """Train `bb` on `dataset` batched by `sampler` (index lists of one global batch each).

    `validation` is the held-out dataset (or None) and its cache. `stop_after` ends the run early
    after that many optimizer steps (as if it crashed), for tests.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from tqdm import tqdm

    from diffbase.training.metrics import MetricsLog

    t, out_dir = config.training, Path(config.experiment.output_dir)
    # Several runs in one process (tests, the demo, notebooks) each get their own precision and
    # accumulation settings; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.hardware.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        cpu=on_cpu(config),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        accelerator.print(f"training on {world} processes ({accelerator.distributed_type.value})")
    torch.manual_seed(config.experiment.seed)  # the same initial adapter weights in every process and run
    method: MethodState = prepare_method(bb, t)
    if config.hardware.mixed_precision != "no":  # what trains is kept in fp32; autocast runs the rest in half
        for p in method.trainable:
            p.data = p.data.float()
    attention = choose(config.hardware.attention_backend, accelerator.device)
    apply_attention(attention, [bb.denoiser, *method.modules.values()])
    if world > 1 and not method.wraps_denoiser:  # its module is never called through a DDP wrapper
        raise UserError(f"training.method: {t.method} trains in one process for now (no gradient sync across {world})")
    trained = next(iter(method.modules.values()))
    trained.train()  # modules load in eval mode; LoRA dropout acts only in train mode
    optimizer = make_optimizer(method.trainable, config)
    steps = total_steps(config, len(sampler))
    schedule = t.schedule
    if schedule.warmup_epochs > 0:  # in optimizer steps of this data and batch size
        per_epoch = math.ceil(len(sampler) / t.gradient_accumulation)
        schedule = replace(schedule, warmup_steps=max(1, round(schedule.warmup_epochs * per_epoch)))
    lr_scheduler = make_scheduler(optimizer, steps, t.learning_rate, schedule)
    ema = None
    if t.ema.enabled:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(method.trainable, decay=t.ema.decay)
    trained, optimizer = accelerator.prepare(trained, optimizer)
    controlnet = trained if t.method == "controlnet" else None
    if controlnet is not None:
        bb.controlnet = accelerator.unwrap_model(trained)
    elif method.wraps_denoiser:
        bb.forward = trained

    def loss_of(batch: dict[str, Any], step: int) -> torch.Tensor:
        return step_loss(config, bb, method, batch, cache, step, controlnet)

    masked = config.data.masked_loss
    set_checkpointing(
        config, accelerator, method, lambda: probe_step(accelerator, dataset, sampler, loss_of, optimizer, masked)
    )

    progress = ckpt.Progress()
    ckpt_root = out_dir / "checkpoints"
    found = ckpt.resolve_resume(ckpt_root, resume)
    if found is not None:
        progress, tensors, objects = ckpt.load_checkpoint(found)
        if (found / "accelerate_state").is_dir():  # saved sharded (FSDP / DeepSpeed): weights and optimizer
            accelerator.load_state(str(found / "accelerate_state"))
        else:
            load_trained_state_dict(method, tensors)
            optimizer.load_state_dict(objects["optimizer"])
        lr_scheduler.load_state_dict(objects["lr_scheduler"])
        if ema is not None and "ema" in tensors:
            ema.load_state_dict({"shadow_params": list(tensors["ema"].values()), **objects["ema_meta"]})
        accelerator.print(f"resumed from {found} at step {progress.step}")

    result = TrainResult(steps=progress.step, output_dir=out_dir)
    metrics = MetricsLog(out_dir, enabled=accelerator.is_main_process, resume_step=progress.step)
    grad_norm = torch.tensor(0.0)
    bar = tqdm(
        total=steps,
        initial=progress.step,
        desc=f"train {t.method}",
        unit="step",
        disable=not (show_progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    start, first_step = time.perf_counter(), progress.step
    micro = 0
    done = progress.step >= steps
    while not done:
        sampler.set_epoch(progress.epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(progress.epoch)
        batches = list(sampler)
        for b_index in range(progress.batch_in_epoch, len(batches)):
            indices = batches[b_index]
            per_rank = len(indices) // world
            local = indices[rank * per_rank : (rank + 1) * per_rank] if world > 1 else indices
            batch = read_batch(dataset, local, config.data.masked_loss)
            if not batch["index"]:  # every file of this batch failed to load (reported at the end)
                progress.batch_in_epoch = b_index + 1
                continue
            with accelerator.accumulate(trained), accelerator.autocast():
                loss = loss_of(batch, progress.step)
                finite = torch.isfinite(loss).all()
                if world > 1:  # every process must agree to skip, or DDP hangs
                    finite = accelerator.reduce(finite.float(), reduction="min") > 0
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:  # an infinite bound measures the norm without clipping
                        grad_norm = accelerator.clip_grad_norm_(method.trainable, t.max_grad_norm or math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.zero_grad(set_to_none=True)
            micro += 1
            progress.batch_in_epoch = b_index + 1
            if not accelerator.sync_gradients:
                continue
            if not finite:
                progress.nonfinite_total += 1
                progress.nonfinite_in_row += 1
                result.skipped_nonfinite += 1
                if progress.nonfinite_in_row >= t.max_nonfinite_steps:
                    bar.close()  # the message goes on a line of its own
                    raise UserError(
                        f"training: {progress.nonfinite_in_row} non-finite losses in a row at step "
                        f"{progress.step}; lower training.learning_rate or check the data"
                    )
                continue
            progress.nonfinite_in_row = 0
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
            lr_scheduler.step()
            if ema is not None:
                ema.step(method.trainable)
            progress.step += 1
            value = accelerator.reduce(loss.detach(), reduction="mean").item()
            result.losses.append(value)
            result.step_times.append(time.perf_counter())
            rate = (progress.step - first_step) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", it_s=f"{rate:.2f}")
            bar.update(1)
            metrics.scalars(
                progress.step, loss=value, lr=lr, grad_norm=float(grad_norm if grad_norm is not None else "nan")
            )
            if progress.step >= steps or (stop_after is not None and progress.step - first_step >= stop_after):
                done = True
            if done or (t.checkpoint_every and progress.step % t.checkpoint_every == 0):
                result.checkpoint = save(
                    accelerator, ckpt_root, progress, method, trained, optimizer, lr_scheduler, ema, t.keep_checkpoints
                )
            if done or (t.validation.every and progress.step % t.validation.every == 0):
                validate(accelerator, config, bb, dataset, validation, metrics, progress.step, result)
            if done:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    metrics.plot()
    metrics.close()
    bb.forward = None
    result.backbone = bb
    result.steps = progress.step
    result.finished = progress.step >= steps
    return result


def step_loss(
    config: Config,
    bb: B.Backbone,
    method: MethodState,
    batch: dict[str, Any],
    cache: Any | None,
    step: int,
    controlnet: Any = None,
) -> torch.Tensor:
    """One batch's loss: the method's own, or the standard diffusion loss."""
    t = config.training
    if method.loss is not None:
        return method.loss(bb, batch, config.experiment.seed, step)
    encoded, cond = encode_batch(bb, batch, cache)
    return diffusion_step_loss(
        bb,
        t.objective,
        encoded,
        cond,
        config.experiment.seed,
        step,
        controlnet=controlnet,
        control_scale=t.controlnet.conditioning_scale,
        weights=batch.get("weight"),
    )


def probe_step(accelerator: Any, dataset: Any, sampler: Any, loss_of: Any, optimizer: Any, masked: bool) -> None:
    """Forward and backward of the first batch, gradients dropped: what `auto` checkpointing measures."""
    indices = next(iter(sampler))
    per_rank = len(indices) // accelerator.num_processes
    local = indices[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    with accelerator.autocast():
        loss = loss_of(read_batch(dataset, local, masked), 0)
    accelerator.backward(loss)
    optimizer.zero_grad(set_to_none=True)


def set_checkpointing(config: Config, accelerator: Any, method: MethodState, probe: Any) -> None:
    """hardware.gradient_checkpointing: true, false, or auto (measured by one probe step on a GPU)."""
    from diffbase.training.memory import probe_needs_checkpointing

    setting = config.hardware.gradient_checkpointing
    on = setting is True
    if setting == "auto":
        on, why = probe_needs_checkpointing(probe, accelerator.device)
        if accelerator.num_processes > 1:  # every process makes the same choice
            on = bool(accelerator.reduce(torch.tensor(float(on), device=accelerator.device), reduction="max") > 0)
        accelerator.print(f"gradient checkpointing: {why}")
    if on:
        for module in method.modules.values():
            inner = accelerator.unwrap_model(module)
            if hasattr(inner, "enable_gradient_checkpointing"):
                inner.enable_gradient_checkpointing()


def validate(
    accelerator: Any,
    config: Config,
    bb: B.Backbone,
    dataset: Any,
    validation: tuple[Any, Any],
    metrics: Any,
    step: int,
    result: TrainResult,
) -> None:
    """Validation images and held-out loss (or, for try-on, held-out try-on error), computed by the
    main process while the others wait. DreamFit has no validation yet."""
    from diffbase.io import save_png_atomic

    v, method = config.training.validation, config.training.method
    held_out, cache = validation
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and is_sharded(accelerator):
        if v.prompts or held_out is not None:
            accelerator.print("validation: skipped, the model is sharded across processes (FSDP/DeepSpeed)")
    elif accelerator.is_main_process and method != "dreamfit":
        with accelerator.autocast():  # as diffusers' scripts validate: fp32 trained weights beside a half base
            grid, error, name = validation_outputs(config, bb, dataset, validation)
        if grid is not None:
            save_png_atomic(grid, Path(config.experiment.output_dir) / "validation" / f"step-{step:06d}.png")
            metrics.image(step, "validation", grid)
        if error is not None:
            result.val_losses.append((step, error))
            metrics.scalars(step, **{name: error})
    accelerator.wait_for_everyone()


def validation_outputs(
    config: Config, bb: B.Backbone, dataset: Any, validation: tuple[Any, Any]
) -> tuple[Any, float | None, str]:
    """(image grid or None, held-out error or None, the error's metric name)."""
    from diffbase.training.validation import validation_images, validation_loss

    v, held_out, cache = config.training.validation, *validation
    if config.training.method == "vton":
        if held_out is None:
            return None, None, ""
        from diffbase.tryon.evaluate import tryon_validation

        return (*tryon_validation(config, bb, held_out), "val_masked_l1")
    grid = validation_images(config, bb, dataset) if v.prompts else None
    error = validation_loss(config, bb, held_out, cache) if held_out is not None else None
    return grid, error, "val_loss"


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save(
    accelerator: Any,
    root: Path,
    progress: ckpt.Progress,
    method: MethodState,
    trained: Any,
    optimizer: Any,
    lr_scheduler: Any,
    ema: Any,
    keep: int,
) -> Path:
    """Checkpoint after every process reached the same step. Under DDP the main process has all it
    needs. Under FSDP and DeepSpeed every process takes part: the trained weights are gathered to
    the main process, and accelerate writes the sharded optimizer state, which is moved in."""
    accelerator.wait_for_everyone()
    folders, full = {}, None
    if is_sharded(accelerator):
        full = accelerator.get_state_dict(trained)
        shards = root / f".tmp-optimizer-{progress.step:06d}"
        accelerator.save_state(str(shards))
        folders["accelerate_state"] = shards
    if accelerator.is_main_process:
        tensors = trained_state_dict(method, full)
        objects = {"lr_scheduler": lr_scheduler.state_dict()}
        if not folders:
            objects["optimizer"] = optimizer.state_dict()
        if ema is not None:
            state = ema.state_dict()
            tensors["ema"] = {f"{i:05d}": p for i, p in enumerate(state.pop("shadow_params"))}
            objects["ema_meta"] = state
        ckpt.save_checkpoint(root, progress, tensors, objects, keep, folders)
    accelerator.wait_for_everyone()
    return root / f"step-{progress.step:06d}"
