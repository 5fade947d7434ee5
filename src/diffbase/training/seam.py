"""The method seam's types: what a training method is (a record of plain functions) and what it hands
the loop. They sit under the loop, so the loop, the step and every method are typed against them; the
registry of methods (diffbase.methods.registry) sits above.

A method says what it adds to a backbone and which parameters train (`prepare`), what a batch is
(`dataset`), its loss with the terms to log (`loss`), what validation shows (`validate`), what it
writes for users (`export`), and how its result is used (`load` / `run`, the inference API the CLI,
the demo and the web UI call). A method package's command, web tab and benchmark stages are modules
found by name beside its record (diffbase.methods.part), so a method never imports upward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.models.backbone import Backbone


@dataclass
class Trained:
    """What a method trains on a backbone. Every module in `modules` goes through accelerate (DDP, FSDP,
    DeepSpeed wrap it) and is checkpointed by `state_dict` / `load_state_dict`."""

    modules: dict[str, torch.nn.Module]
    trainable: list[torch.nn.Parameter]
    state_dict: Callable[[Trained, dict[str, Any] | None], dict[str, dict[str, torch.Tensor]]] | None = None
    load_state_dict: Callable[[Trained, dict[str, dict[str, torch.Tensor]]], None] | None = None
    calls: dict[str, Any] = field(default_factory=dict)  # the prepared (wrapped) modules, set by the loop
    extras: dict[str, Any] = field(default_factory=dict)  # the method's own state (DreamFit's banks, caches)
    checkpointing: Callable[[], None] | None = None  # turns gradient checkpointing on (default: on `modules`)
    param_groups: list[dict[str, Any]] | None = None  # optimizer groups with their own lr (default: one, `trainable`)
    # some trainable parameters get no gradient in a step (a LoRA that is never applied, or that changes only an
    # output the loss discards): under several processes DDP then looks for them (its find_unused_parameters)
    find_unused_parameters: bool = False

    def call(self, name: str) -> Any:
        """A trained module as the step must call it: through its DDP/FSDP wrapper when there is one."""
        wrapped = self.calls.get(name)
        return wrapped if wrapped is not None else self.modules[name]  # a container module may be falsy


@dataclass
class Validation:
    grid: Any = None  # a PIL image people look at, or None
    metrics: dict[str, float] = field(default_factory=dict)


Loss = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[Backbone, Config], Trained]  # (backbone, config): freeze, add, unfreeze what trains
    loss: Callable[
        [Config, Backbone, Trained, dict[str, Any], Any, int], Loss
    ]  # (config, bb, trained, batch, cache, step)
    export: Callable[[Config, Backbone, Trained, Path], dict[str, str]]  # -> {format: path}
    dataset: Callable[[Config, bool, Any], Any]  # (config, held_out, bb) -> dataset or None
    validate: Callable[[Config, Backbone, Trained, Any, tuple[Any, Any]], Validation]
    section: tuple[str, type] | None = None  # ("lora", LoraConfig): the `training.<name>` keys it reads
    multi_process: bool = True  # False: its modules are not called through DDP, so training is single-process
    cacheable: bool = True  # data.cache_latents / cache_text apply to its batches
    cache: Callable[[Config, Any, Any, bool], Any] | None = None  # its own cache: (config, bb, dataset, progress)
    # -> (TrainingCache, CacheStats); default: the image slots' latents and the captions
    load: Callable[..., Any] | None = None  # inference: load(model, weights, device=, dtype=, offload=)
    run: Callable[..., Any] | None = None  # inference: run(loaded, inputs, settings) -> PIL image
    describe: str = ""
    aliases: tuple[str, ...] = ()  # old names still read in configs (and their section under that name)
    check: Callable[[Config], None] | None = None  # its settings, checked before anything loads
    metrics: tuple[str, ...] = ()  # the training.validation.metrics its `validate` computes
