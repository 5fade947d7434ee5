"""The Kontext benchmark stage: a LoRA on paired edits through `train(config)`, twice the tokens of a
text-to-image step (the source's reference tokens), the source latents cached."""

from __future__ import annotations

from diffbase.interface.bench import Context, Stage, diffbase_train, gib, train_config
from diffbase.methods.edit.method import KONTEXT


def stage_kontext(ctx: Context) -> None:
    """Kontext LoRA through `train(config)`: twice the tokens of a text-to-image step (the source's
    reference tokens), the source latents cached."""
    from diffbase.data.synthetic import write_edit_pairs

    s = ctx.sizes
    res = s.train_res
    data = write_edit_pairs(ctx.work / "edit-pairs", s.images, size=(res, res))
    model = "experiments/flux1_kontext_dev_lora.yaml" if not ctx.tiny else "experiments/tiny/flux1_kontext.yaml"
    config = train_config(
        ctx, model, "kontext", f"data.train_path={data / 'metadata.jsonl'}", "data.cache_latents=true",
        "data.cache_text=true", "training.validation.loss_split=0", "training.validation.prompts=[]",
    )  # fmt: skip
    ctx.log("kontext: diffbase, cached")
    info = diffbase_train(ctx, config, KONTEXT, validation=False)
    label = f"FLUX.1 Kontext LoRA r16, {res}px target + {res}px source, batch 1, cached"
    ctx.add("kontext", f"{label}: s/step", f"{info['s_step']:.3f}")
    ctx.add("kontext", f"{label}: peak memory in the training loop", gib(info["peak"]))


STAGES = (Stage("kontext", stage_kontext),)
