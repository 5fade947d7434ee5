"""DreamFit on FLUX.1 (the official training code was never released): every DreamFit LoRA trains, the
base stays frozen, flow matching on the person image, with the write pass inside the same step so the
loss reaches the write-pass LoRAs through the banks. Saved in the official key layout.

A batch is a try-on pair (diffbase.methods.tryon.mechanism.data): the reference is the garment alone (garment mode),
[pose render | garment] (pose mode) or [keep image | garment] (try-on mode; the keep image is the
person with the garment area blacked out), the target is the person, the caption the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.methods.tryon import method as vton
from diffbase.models import backbone as B
from diffbase.models import families
from diffbase.training.metrics import PAIRED_METRICS
from diffbase.training.objectives import diffusion_loss, sample_flow_sigmas
from diffbase.training.step import sample_generator
from diffbase.training.validation import paired_metrics


@dataclass
class DreamFitConfig:
    """DreamFit training: LoRAs on every block, the write pass inside the step."""

    mode: Literal["garment", "pose", "tryon"] = "tryon"
    rank: int = 16
    size: list[int] = field(default_factory=lambda: [1024, 768])  # person (and reference) height, width
    prompt: str | None = None  # one prompt for every item instead of the captions
    # with hardware.gradient_checkpointing on, the passes checkpointed. The write pass holds about 70% of
    # the activations (FLUX.1-dev, 1024x768 try-on: 47 of 67 GiB) and recomputing it costs about a fifth
    # of a step; [write, read] saves 19 GiB more for a second recompute (benchmarks/dreamfit.py)
    checkpoint_passes: list[str] = field(default_factory=lambda: ["write"])
    validation_items: int = 4  # held-out pairs generated at each validation (training.validation.loss_split > 0)


def prepare(bb: Any, config: Config) -> Trained:
    from diffbase.methods.dreamfit.mechanism.checkpoint import Dims
    from diffbase.methods.dreamfit.mechanism.loras import DreamFitLoras
    from diffbase.methods.dreamfit.mechanism.passes import bank_checkpointing, install

    families.require(bb.family, "flux1", f"training.method: dreamfit trains on FLUX.1, not {bb.family}")
    text_to_image.freeze(bb)
    loras = DreamFitLoras(Dims.of(bb.denoiser), config.training.dreamfit.rank, seed=0)
    state = install(bb.denoiser, loras.pairs())
    bb.adapters["dreamfit"] = loras

    passes = tuple(config.training.dreamfit.checkpoint_passes)
    if not set(passes) <= {"write", "read"}:
        raise UserError(f"training.dreamfit.checkpoint_passes: expected a list of write and read, got {list(passes)}")

    def checkpointing() -> None:  # the DreamFit processors' state is replayed (see bank_checkpointing)
        bb.denoiser.enable_gradient_checkpointing(bank_checkpointing(state, passes))

    return Trained({"dreamfit": loras}, list(loras.parameters()), extras={"banks": state}, checkpointing=checkpointing,
                   find_unused_parameters=True)  # fmt: skip


def reference_pixels(batch: dict[str, Any], mode: str) -> torch.Tensor:
    """The write pass's pixels: the garment, [pose | garment] or [keep | garment]."""
    garment = batch["garment"]
    if mode == "garment":
        return garment
    if mode == "pose":
        if "pose" not in batch:
            raise UserError("training.dreamfit.mode: pose needs a 'pose' image for every pair in the metadata")
        return torch.cat([batch["pose"], garment], dim=-1)
    keep = batch["person"] * (1 - batch["person_mask"]) - batch["person_mask"]  # blacked out: -1 in [-1, 1]
    return torch.cat([keep, garment], dim=-1)


def write_pass(bb: Any, trained: Trained, ref: torch.Tensor, text: dict[str, Any], guidance: float) -> None:
    """The reference latents through the transformer with the LoRAs on, at timestep 0, filling the banks
    (with gradients: the banks carry them to the write-pass LoRAs)."""
    state, transformer, n, device = trained.extras["banks"], bb.forward or bb.denoiser, ref.shape[0], bb.device
    g = torch.full([n], guidance, device=device) if bb.denoiser.config.guidance_embeds else None
    ids = B.image_ids(bb, ref)
    state.clear()
    state.mode = "write"
    try:
        transformer(
            hidden_states=B.pack(bb, ref),
            timestep=torch.zeros(n, device=device),
            guidance=g,
            pooled_projections=text["pooled_prompt_embeds"].expand(n, -1),
            encoder_hidden_states=text["prompt_embeds"].expand(n, -1, -1),
            txt_ids=text["text_ids"],
            img_ids=ids[0] if ids.dim() == 3 else ids,
            return_dict=False,
        )
    finally:
        state.mode = "read"


def step_inputs(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]:
    """(person latents, reference latents, read-pass text, write-pass text): from the cache where it has
    them, else from the VAE (its mean, as the cache holds) and the text encoders."""
    from diffbase.methods.dreamfit.mechanism.generate import GARMENT_TEXT

    d, device = config.training.dreamfit, bb.device
    prompts = [d.prompt] * len(batch["index"]) if d.prompt is not None else batch["caption"]
    if cache is not None and cache.latents is not None:
        latents = cache.tensors(batch, "pair")
        person, ref = latents["person"], latents["reference"]
    else:
        with torch.no_grad():
            person = B.encode_images(bb, batch["person"].to(device), sample=False)
            ref = B.encode_images(bb, reference_pixels(batch, d.mode).to(device), sample=False)
    if cache is not None and cache.text is not None:
        return person, ref, cache.conditioning(prompts), cache.conditioning([GARMENT_TEXT[d.mode]])
    if "garment_text" not in trained.extras:
        trained.extras["garment_text"] = B.encode_prompts(bb, [GARMENT_TEXT[d.mode]])
    return person, ref, B.encode_prompts(bb, prompts), trained.extras["garment_text"]


def loss(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Write pass on the reference, then flow matching on the person (`passes`), run inside the call of the
    LoRAs' module (`trained.call`: its DDP wrapper under several processes).

    Why so: the LoRAs act inside the frozen transformer (processors and hooks), and DDP reduces the
    gradients of the module it wraps only after that module's own forward ran (which prepares the
    reduction); a container whose forward runs both passes gives it that, with no change to the loop and
    nothing to all-reduce by hand. Some LoRAs get no gradient in any step (the text stream's modulation LoRA
    is never applied; the last single block's query and output LoRAs change only the write pass's
    discarded output), hence `find_unused_parameters`; their gradients stay None, as in one process. The
    banks are per process: each process's write pass fills them from its own samples, its read pass reads
    them, and they are cleared before the backward pass, so nothing of them crosses processes."""
    return trained.call("dreamfit")(passes, config, bb, trained, batch, cache, step)


def passes(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Write pass on the reference, then flow matching on the person (the configured timestep sampling
    and guidance value), reading the banks."""
    objective = config.training.objective
    state = trained.extras["banks"]
    gens = [sample_generator(config.experiment.seed, step, i) for i in batch["index"]]
    x0, ref, cond, garment_text = step_inputs(config, bb, trained, batch, cache)
    write_pass(bb, trained, ref, garment_text, objective.guidance)
    seq_len = B.image_seq_len(bb, tuple(x0.shape[-2:]))
    scheduler = dict(bb.pipe.scheduler.config)
    sigma = torch.cat([sample_flow_sigmas(objective, 1, scheduler, seq_len, generator=g) for g in gens])
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
    noisy = B.add_noise(bb, x0, noise, sigma)
    pred = B.denoise(bb, noisy, B.model_timesteps(bb, sigma).to(bb.device), cond, guidance=objective.guidance)
    state.clear()  # the banks live on in the graph only, until the backward pass
    state.mode = "off"
    return diffusion_loss(pred, B.target(bb, x0, noise, sigma)), {}


def encode_pairs(config: Config, bb: Any, dataset: Any, show_progress: bool = True) -> tuple[Any, Any]:
    """DreamFit's cache. Per pair, the person's latent and the write pass's reference latent (the VAE
    mean, as the step encodes them), keyed by the pair's files, the mode, the size and the VAE; the
    read pass's prompts (the fixed prompt or the captions) and the mode's garment text."""
    from diffbase.data.cache import build_item_cache
    from diffbase.methods.dreamfit.mechanism.generate import GARMENT_TEXT

    f = config.training.dreamfit

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = bb.device
        return {
            "person": B.encode_images(bb, batch["person"].to(device), sample=False),
            "reference": B.encode_images(bb, reference_pixels(batch, f.mode).to(device), sample=False),
        }

    prompts = {f.prompt} if f.prompt is not None else {r.caption for r in dataset.records}
    tag = ("dreamfit", f.mode, tuple(f.size))
    return build_item_cache(config, bb, dataset, tag, encode, prompts | {GARMENT_TEXT[f.mode]}, show_progress)


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    return vton.pairs_dataset(config, held_out, config.training.dreamfit.size)


def validate(config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]) -> Validation:
    """Held-out pairs generated with the LoRAs being trained, as `diffbase dreamfit` makes them (the write pass
    on the mode's reference, sampling that reads; try-on keeps the person outside the mask): a grid (reference |
    result | person), `val_loss` (the training loss at fixed noise on up to 8 pairs), in try-on mode the L1
    inside the garment mask (`val_masked_l1`), and training.validation.metrics against the person."""
    from diffbase.grid import image_grid

    held_out, _ = validation
    if held_out is None:
        return Validation()
    rows, errors = [], []
    for i in range(min(config.training.dreamfit.validation_items, len(held_out))):
        batch = held_out.collate([held_out[i]])
        if batch["index"]:
            reference, result, person, error = held_out_sample(config, bb, trained, batch, i)
            rows.append([reference, result, person])
            errors += [error] if error is not None else []
    metrics = {"val_loss": held_out_loss(config, bb, trained, held_out)}
    metrics |= {"val_masked_l1": sum(errors) / len(errors)} if errors else {}
    metrics |= paired_metrics(config, [r[1] for r in rows], [r[2] for r in rows])
    grid = image_grid(rows, header=["reference", "result", "person"]) if rows else None
    return Validation(grid, metrics)


@torch.no_grad()
def held_out_sample(config: Config, bb: Any, trained: Trained, batch: dict[str, Any], i: int) -> tuple[Any, ...]:
    """(reference, result, person, L1 inside the mask in try-on mode else None) of one held-out pair."""
    from PIL import Image

    from diffbase.data.datasets import to_pil
    from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings, dreamfit_generate
    from diffbase.methods.tryon.mechanism.metrics import masked_l1

    d, v = config.training.dreamfit, config.training.validation
    h, w = d.size
    reference, person = to_pil(reference_pixels(batch, d.mode)[0]), to_pil(batch["person"][0])
    settings = DreamFitSettings(prompt=d.prompt if d.prompt is not None else batch["caption"][0], mode=d.mode,
                                steps=v.steps, guidance=v.guidance if v.guidance is not None else 4.0,
                                seed=v.seed + i, height=h, width=w)  # fmt: skip
    was_training = bb.denoiser.training
    bb.denoiser.eval()
    try:
        result = dreamfit_generate(bb.pipe, trained.extras["banks"], settings, reference)
    finally:
        bb.denoiser.train(was_training)
    if d.mode != "tryon":
        return reference, result, person, None
    mask = batch["person_mask"][0, 0].numpy() > 0.5
    result = Image.composite(result, person, Image.fromarray(mask.astype("uint8") * 255, "L"))  # as `dreamfit` does
    got = torch.from_numpy(np.asarray(result, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return reference, result, person, float(masked_l1(got, batch["person"].float(), batch["person_mask"])[0])


@torch.no_grad()
def held_out_loss(config: Config, bb: Any, trained: Trained, held_out: Any, pairs: int = 8) -> float:
    """The training loss on up to `pairs` held-out pairs with the noise and sigmas of step 0 (fixed: comparable
    from check to check)."""
    values = []
    for i in range(min(pairs, len(held_out))):
        batch = held_out.collate([held_out[i]])
        if batch["index"]:
            values.append(float(passes(config, bb, trained, batch, None, 0)[0]))
    return sum(values) / len(values) if values else float("nan")


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    """The official key layout, so the official inference code can load it."""
    return {"dreamfit": str(trained.modules["dreamfit"].save_official(out_dir / "dreamfit" / "dreamfit.bin"))}


def load(
    model: str, checkpoint: str, lora_weight: float = 1.0, lora_weight_mode: str = "official", **runtime: Any
) -> tuple[Any, Any]:
    """A FLUX.1 pipeline with an official DreamFit checkpoint installed: (pipe, bank state). The LoRA pairs are
    not modules of the transformer: they wait where it computes, under any offload."""
    from diffbase.methods.dreamfit.mechanism.checkpoint import load_dreamfit
    from diffbase.methods.dreamfit.mechanism.passes import install
    from diffbase.models.loading import load_pipeline
    from diffbase.models.placement import execution_device

    pairs: dict[str, Any] = {}

    def prepare(pipe: Any, spec: Any) -> None:  # read and checked before quantizing (the shapes are the model's)
        families.require(spec.family, "flux1", f"--model: DreamFit runs on FLUX.1; {model} holds a {spec.family} model")
        pairs.update(load_dreamfit(checkpoint, pipe.transformer, lora_weight, lora_weight_mode))

    pipe, _ = load_pipeline(model, **runtime, prepare=prepare)
    device = execution_device(pipe)
    for pair in pairs.values():  # small (rank 16-32): on the compute device, whatever the offload
        pair.down, pair.up = pair.down.to(device), pair.up.to(device)
    return pipe, install(pipe.transformer, pairs)


def run(loaded: tuple[Any, Any], inputs: dict[str, Any], settings: Any, repaint: bool = True) -> Any:
    """One image: `inputs` has the garment and, by mode, a pose image or person and mask (PIL). Try-on
    keeps the person's own pixels outside the mask (`repaint`), as `diffbase tryon` does."""
    from PIL import Image

    from diffbase.methods.dreamfit.mechanism.generate import dreamfit_generate, keep_image, reference_image

    pipe, state = loaded
    first = inputs.get("pose")
    if settings.mode == "tryon":
        if inputs.get("person") is None or inputs.get("mask") is None:
            raise UserError("--mode tryon: needs --person and --mask (and optionally --pose)")
        first = keep_image(inputs["person"], inputs["mask"], first)
    size = (settings.width, settings.height)
    image = dreamfit_generate(pipe, state, settings, reference_image(settings.mode, inputs["garment"], size, first))
    if settings.mode == "tryon" and repaint:
        person, mask = inputs["person"].convert("RGB").resize(size, Image.BICUBIC), inputs["mask"].convert("L")
        image = Image.composite(image, person, mask.resize(size, Image.NEAREST).point(lambda v: 255 if v > 127 else 0))
    return image


DREAMFIT = register(
    Method(
        name="dreamfit",
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=dataset,
        validate=validate,
        metrics=PAIRED_METRICS,
        section=("dreamfit", DreamFitConfig),
        cache=encode_pairs,
        load=load,
        run=run,
        describe="DreamFit's LoRAs with the write pass inside the step",
    )
)
