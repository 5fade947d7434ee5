"""From a config and a method to trained weights, exported where users expect them: the backbone, the
datasets and the cache are set up here, the one loop trains, the method exports."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.io import is_disk_full
from diffbase.models.backbone import Backbone
from diffbase.models.placement import place_for_training
from diffbase.training import run_folder, sharding
from diffbase.training.checkpoint import hold_for_test
from diffbase.training.loop import TrainResult, check_ema, ema_weights, process_state, run_training
from diffbase.training.seam import Method


def load_backbone(config: Config, state: Any = None) -> Backbone:
    """The model from `model.pretrained_path` (folder or single file), or built from config with random
    weights when no path is given (tiny models, and full-size speed tests)."""
    from diffbase.models.build import build_pipeline
    from diffbase.models.loading import load_model
    from diffbase.models.specs import spec_for

    m, state = config.model, state or process_state(config)
    if m.pretrained_path:
        pipe, spec = load_model(
            m.single_file or m.pretrained_path, config=m.pretrained_path if m.single_file else None, dtype=m.dtype
        )
    elif m.variant.startswith("tiny") or m.random_weights:
        spec = spec_for(m.family, m.variant)
        # Built where it will run: a 12B-parameter random model initialises in seconds on a GPU.
        with torch.device(state.device):
            pipe = build_pipeline(m, seed=config.experiment.seed)
    else:
        raise UserError(
            f"model.pretrained_path: required for {m.family} {m.variant}; set it to the local folder of the "
            "weights (or model.random_weights=true for a speed test with random weights)"
        )
    if spec.family != m.family:
        raise UserError(f"model.family: the config says {m.family} but {m.pretrained_path} holds a {spec.family} model")
    pipe.set_progress_bar_config(disable=True)
    if m.quantize not in ("none", None):  # the frozen base in fewer bits, before it moves (what trains stays full)
        from diffbase.models.quantize import quantize_pipeline
        from diffbase.runtime import torch_dtype

        quantize_pipeline(pipe, spec, m.quantize, torch_dtype(m.dtype), device=state.device)
    bb = Backbone(spec, pipe)
    place_for_training(bb, state.device, config.hardware.offload)
    return bb


def image_dataset(config: Config, held_out: bool = False, adjust: Any = None) -> Any:
    """Images with captions (and masks, controls, references) from `data`, or with `held_out` the
    validation split. `adjust` may change the training records (DreamBooth adds class images)."""
    from diffbase.data.datasets import TrainDataset, build_records, split_records

    records = build_records(config.data, config.experiment.seed)
    records, validation = split_records(records, config.training.validation.loss_split, config.experiment.seed)
    if held_out:
        if not validation:
            return None
        val_cfg = replace(config.data, caption_dropout=0.0, random_flip=False, crop="center")
        return TrainDataset(validation, val_cfg, config.experiment.seed)
    if config.data.masked_loss:
        unmasked = next((r.image for r in records if r.mask is None), None)
        if unmasked is not None:
            raise UserError(f"data.masked_loss: {unmasked} has no mask; give every image a 'mask' in the metadata")
    if adjust is not None:
        records = adjust(records)
    return TrainDataset(records, config.data, config.experiment.seed)


def prepare_cache(
    config: Config,
    bb: Backbone,
    datasets: list[Any],
    show_progress: bool = True,
    method: Method | None = None,
    state: Any = None,
) -> list[Any]:
    """Fill the cache for each dataset (computing only what is missing), then free what training
    no longer needs. Returns a cache per dataset. A method with its own `cache` builds it instead
    of the image latents and captions."""
    from diffbase.data.cache import build_cache as generic
    from diffbase.data.cache import free_encoders

    build_cache = method.cache if method is not None and method.cache is not None else generic
    state = state or process_state(config)
    caches = []
    if state.is_main_process:  # one process computes; the others then read its shards
        for dataset in datasets:
            cache, stats = build_cache(config, bb, dataset, show_progress)
            caches.append(cache)
            print(f"cache: {stats.summary()}")
    state.wait_for_everyone()
    if not state.is_main_process:
        caches = [build_cache(config, bb, dataset, show_progress=False)[0] for dataset in datasets]
    d = config.data
    own = build_cache is not generic  # its validation may run the whole method on held-out pixels
    for k, dataset in enumerate(datasets):
        dataset.load_pixels = not d.cache_latents or (own and k > 0)
    keep = bool(config.training.validation.prompts) or (own and len(datasets) > 1)
    free_encoders(bb, d.cache_latents, d.cache_text, keep_for_validation=keep)
    return caches


def datasets(
    config: Config, method: Method, bb: Backbone, show_progress: bool, state: Any
) -> tuple[Any, Any, Any, list[Any]]:
    """The training dataset, its sampler, the held-out dataset and their caches (None when off)."""
    d = config.data
    if (d.cache_latents or d.cache_text) and not method.cacheable:
        raise UserError(f"data.cache_latents: not available for training.method {method.name}")
    dataset = method.dataset(config, False, bb)
    world = state.num_processes
    sampler = dataset.sampler(config.training.batch_size * world)
    if len(sampler) == 0:
        raise UserError(
            f"training.batch_size: {config.training.batch_size * world} is larger than every bucket "
            f"of the {len(dataset)} usable images"
        )
    held_out = method.dataset(config, True, bb)
    caches = [None, None]
    if d.cache_latents or d.cache_text:
        caches = prepare_cache(config, bb, [dataset, held_out] if held_out else [dataset], show_progress, method, state)
        caches += [None]
    return dataset, sampler, held_out, caches


def train(
    config: Config,
    method: Method,
    resume: str | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train `method` (a diffbase.methods Method) as `config` says; the main process exports at the end.
    The output folder is locked for the run; a start that fails with nothing to resume removes what it
    wrote, and a full disk or memory is one line saying what to change."""
    from diffbase.compile import check as check_compile
    from diffbase.models.block_swap import check_settings
    from diffbase.models.quantize import check_trainable_backend
    from diffbase.training.trackers import check_trackers
    from diffbase.training.validation import check_metrics, check_size

    check_settings(config)  # before the folder is claimed or anything loads
    check_compile(config.hardware.compile, config.hardware.offload, device=config.hardware.device)
    check_trainable_backend(config.model.quantize)
    if method.check is not None:
        method.check(config)
    check_metrics(config, method.metrics)
    check_size(config)
    check_ema(config)
    check_trackers(config)
    out_dir = Path(config.experiment.output_dir)
    state = process_state(config)
    try:
        with run_folder.locked(out_dir, enabled=state.is_main_process) as folder:
            if folder is not None:
                run_folder.claim(folder, resume, overwrite)
            state.wait_for_everyone()
            return _train(config, method, state, resume, stop_after, show_progress)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) or is_disk_full(exc):
            raise UserError(disk_full_message(exc, out_dir)) from None
        raise
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise UserError(out_of_memory_message(config, exc)) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise UserError(out_of_memory_message(config, exc)) from None
        raise


def disk_full_message(exc: OSError, out_dir: Path) -> str:
    import shutil

    path = Path(exc.filename) if getattr(exc, "filename", None) else out_dir
    folder = next((p for p in (path, *path.parents) if p.exists()), out_dir)
    free = shutil.disk_usage(folder).free / 2**20
    return (
        f"{path}: no space left on device ({free:.1f} MiB free there); free some space, or set "
        "experiment.output_dir (and data.cache_dir) on a larger disk, then run again (with --resume latest if "
        "a checkpoint was saved)"
    )


def out_of_memory_message(config: Config, exc: BaseException) -> str:
    d, t = config.data, config.training
    where = "the GPU" if isinstance(exc, torch.OutOfMemoryError) else "the machine"
    return (
        f"out of memory on {where} at data.resolution={d.resolution} with training.batch_size={t.batch_size}: "
        "lower data.resolution or training.batch_size, or set hardware.gradient_checkpointing=true"
    )


def _train(
    config: Config, method: Method, state: Any, resume: str | None, stop_after: int | None, show_progress: bool
) -> TrainResult:
    """The run itself, with accelerate's process state resolved once by `train`."""
    from diffbase.io import default_modes, write_json_atomic

    out_dir = Path(config.experiment.output_dir)
    bb = load_backbone(config, state)
    dataset, sampler, held_out, caches = datasets(config, method, bb, show_progress, state)
    result = run_training(
        config, method, bb, dataset, sampler, resume_arg=resume, cache=caches[0], stop_after=stop_after,
        show_progress=show_progress, validation=(held_out, caches[1]), export=exporter(config, method, bb),
    )  # fmt: skip
    if dataset.report.files:
        print(dataset.report.summary())
    gathered = contextlib.nullcontext()
    if result.finished and sharding.is_fsdp(state):  # every process gathers the sharded weights, the main one writes
        modules = list(result.trained.calls.values())
        gathered = sharding.full_weights(modules, trainable_only=False, main=state.is_main_process)
    with gathered:
        if state.is_main_process and result.finished:
            with ema_weights(result.ema, result.trained.trainable):  # the average, when EMA is on
                files = export_atomically(method, config, bb, result.trained, out_dir)
            for path in files.values():  # library writers (safetensors, save_pretrained) leave files owner-only
                default_modes(Path(path))
            write_json_atomic(out_dir / "exports.json", files)
            write_json_atomic(out_dir / "losses.json", result.all_losses)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def exporter(config: Config, method: Method, bb: Backbone) -> Any:
    """export(trained, ema, step): the method's files in OUTPUT_DIR/exports/step-N with that step's validation grid
    and an exports.json, each file whole the moment it appears (a later export never touches an earlier one)."""
    import shutil

    from diffbase.io import default_modes, write_json_atomic

    out_dir = Path(config.experiment.output_dir)

    def export(trained: Any, ema: Any, step: int) -> None:
        folder = out_dir / "exports" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        with ema_weights(ema, trained.trainable):
            files = export_atomically(method, config, bb, trained, folder)
        for path in files.values():
            default_modes(Path(path))
        grid = out_dir / "validation" / f"step-{step:06d}.png"
        if grid.is_file():
            shutil.copyfile(grid, folder / "validation.png")
        write_json_atomic(folder / "exports.json", files)
        print(f"export: step {step} in {folder}")

    return export


def export_atomically(method: Method, config: Config, bb: Backbone, trained: Any, out_dir: Path) -> dict[str, str]:
    """The method writes its files into a staging folder; each top-level folder or file it wrote then
    replaces its namesake in the output folder by a rename, so a kill mid-export leaves the earlier
    export (or none) whole, and only `.export-*` / `.old-*` folders that the next run removes."""
    import os
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        files = method.export(config, bb, trained, staging)
        hold_for_test("export", 0)
        for item in sorted(staging.iterdir()):
            target = out_dir / item.name
            old = out_dir / f".old-{item.name}-{os.getpid()}"
            if target.exists():
                os.replace(target, old)  # set aside, so a kill leaves the old export or the new one whole
            os.replace(item, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: str(out_dir / Path(path).relative_to(staging)) for name, path in files.items()}
