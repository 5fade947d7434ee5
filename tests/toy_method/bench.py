"""The bias-only method's GPU benchmark stage: s/step and peak memory of its training through `train(config)`,
at the benchmark's FLUX.1 LoRA settings (--tiny: the tiny FLUX.1)."""

from __future__ import annotations

from diffbase.interface.bench import Context, Stage, diffbase_train, gib, train_config
from tests.toy_method.method import BIAS_ONLY


def stage_bias_only(ctx: Context) -> None:
    experiment = "experiments/tiny/flux1_lora.yaml" if ctx.tiny else "experiments/flux1_dev_lora.yaml"
    config = train_config(ctx, experiment, "bias-only", "training.method=bias_only")
    info = diffbase_train(ctx, config, BIAS_ONLY, export="biases")
    ctx.add("bias_only", f"FLUX.1 biases only, {ctx.sizes.train_res}px, batch 1: s/step", f"{info['s_step']:.3f}")
    ctx.add("bias_only", "peak memory in the training loop", gib(info["peak"]))


STAGES = (Stage("bias_only", stage_bias_only),)
