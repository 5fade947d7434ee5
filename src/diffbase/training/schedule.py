"""Learning-rate schedule: linear warm-up from a fraction of the lr, then cosine to a floor (ours), or any of
diffusers' schedules by name."""

from __future__ import annotations

import math

from diffbase.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based), for torch's LambdaLR."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / cfg.warmup_steps
    if cfg.type == "constant":
        return 1.0
    floor = min(cfg.floor / base_lr, 1.0) if base_lr > 0 else 0.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


OWN = ("cosine", "constant")


def make_scheduler(optimizer, total_steps: int, base_lr: float, cfg: ScheduleConfig):
    import torch

    if cfg.type not in OWN:
        from diffusers.optimization import get_scheduler

        return get_scheduler(cfg.type, optimizer, step_rules=cfg.step_rules, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=total_steps, num_cycles=cfg.num_cycles, power=cfg.power)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, base_lr, cfg))
