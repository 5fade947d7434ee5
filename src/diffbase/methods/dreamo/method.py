"""DreamO on FLUX.1 (the paper's training; the official release has inference only): a LoRA on the
attention projections and output layers (the layers the official file holds) plus the task and index
condition embeddings, trained with

    loss = lambda_diff * L_diff + lambda_route * L_route + lambda_holder * L_holder

L_diff is flow matching on the target with the references as extra tokens (diagonal ids, condition
embeddings after x_embedder); L_route and L_holder come from attention maps on `probe_blocks` only
(diffbase.methods.dreamo.mechanism.routing). Half of the samples (`plain_text_probability`) drop the placeholders from
the caption, and then have no placeholder loss. `stages` trains progressively: a list of stages, each
with its steps and its mix over data.datasets. The new T5 rows are drawn once (seeded) and kept fixed.
Exported in the official layout (`dreamo/dreamo.safetensors`), so `diffbase customize --version none`
and the official loader read it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.lora import LoraConfig, add_lora
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.models import backbone as B
from diffbase.models import families
from diffbase.training.metrics import PAIRED_METRICS, REFERENCE_METRICS
from diffbase.training.objectives import diffusion_loss, sample_flow_sigmas
from diffbase.training.step import sample_generator
from diffbase.training.validation import paired_metrics, reference_metrics


@dataclass
class DreamOStage:
    name: str = "stage"
    steps: int = 100
    mix: list[float] | None = None  # weight per data.datasets entry; None: every dataset alike


@dataclass
class DreamOConfig:
    """DreamO training (LoRA rank and alpha from `training.lora`)."""

    size: list[int] = field(default_factory=lambda: [1024, 1024])  # target height, width
    reference_resolution: int = 512  # references resized to about this squared, as at inference
    lambda_diff: float = 1.0
    lambda_route: float = 1.0
    lambda_holder: float = 1.0
    probe_blocks: list[str] = field(default_factory=lambda: ["transformer_blocks.0"])  # where the maps are taken
    plain_text_probability: float = 0.5
    stages: list[DreamOStage] = field(default_factory=list)
    validation_items: int = 2


def placeholder_rows(bb: Any, seed: int) -> torch.Tensor:
    """The ten new T5 rows (seeded, with the vocabulary's spread), added to the tokenizer and T5 once."""
    from diffbase.methods.dreamo.mechanism.conditions import PLACEHOLDERS, add_placeholder_tokens

    if "dreamo_rows" not in bb.adapters:
        weight = bb.pipe.text_encoder_2.get_input_embeddings().weight
        if weight.device.type == "meta":  # `diffbase plan` prepares on the meta device: the rows' shape is enough
            bb.adapters["dreamo_rows"] = torch.empty(len(PLACEHOLDERS), weight.shape[1], device="meta")
            return bb.adapters["dreamo_rows"]  # (T5 does not train: its ten new rows change no count)
        g = torch.Generator().manual_seed(seed)
        bb.adapters["dreamo_rows"] = torch.randn(len(PLACEHOLDERS), weight.shape[1], generator=g) * float(
            weight.detach().float().std()
        )
        add_placeholder_tokens(bb.pipe.tokenizer_2, bb.pipe.text_encoder_2, bb.adapters["dreamo_rows"])
    return bb.adapters["dreamo_rows"]


def prepare(bb: Any, config: Config) -> Trained:
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings
    from diffbase.methods.dreamo.mechanism.files import lora_modules
    from diffbase.methods.dreamo.mechanism.processor import install_probes

    families.require(bb.family, "flux1", f"training.method: dreamo trains on FLUX.1, not {bb.family}")
    d, lc = config.training.dreamo, config.training.lora
    text_to_image.freeze(bb)
    emb = DreamOEmbeddings.for_pipe(bb.pipe)
    emb.init_for_training(placeholder_rows(bb, config.experiment.seed))
    emb.to(bb.device)
    add_lora(
        bb.denoiser, "flux1", LoraConfig(lc.rank, lc.alpha, lc.dropout, lc.target_modules or lora_modules(bb.denoiser))
    )
    probes = install_probes(bb.denoiser, list(d.probe_blocks)) if d.lambda_route or d.lambda_holder else None
    params = [p for p in bb.denoiser.parameters() if p.requires_grad] + [emb.task.weight, emb.idx.weight]

    def state_dict(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        from diffbase.methods.lora import lora_state_dict

        return lora_state_dict(trained, full) | {"dreamo": {k: v.detach() for k, v in emb.state_dict().items()}}

    def load_state_dict(trained: Trained, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        from diffbase.methods.lora import load_lora_state_dict

        load_lora_state_dict(trained, tensors)
        emb.load_state_dict(tensors["dreamo"])

    return Trained({"denoiser": bb.denoiser, "dreamo": emb}, params, state_dict, load_state_dict,
                   extras={"probes": probes})  # fmt: skip


def captions_and_marks(
    config: Config, bb: Any, batch: dict[str, Any], step: int, plain_text: float | None = None
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Per sample: the caption (placeholders dropped with probability `plain_text`, default
    `plain_text_probability`) and its placeholders' (T5 position, reference) marks."""
    from diffbase.methods.dreamo.mechanism.data import placeholder_marks, strip_placeholders

    d, tok = config.training.dreamo, bb.pipe.tokenizer_2
    length = B.text_length(bb.pipe, "flux1").get("max_sequence_length", 512)
    captions, marks = [], []
    for i, caption in zip(batch["index"], batch["caption"], strict=True):
        rng = random.Random(config.experiment.seed * 1_000_003 + step * 10_007 + i)
        plain = rng.random() < (d.plain_text_probability if plain_text is None else plain_text)
        captions.append(strip_placeholders(caption) if plain else caption)
        refs = len(batch["route_masks"])  # one per reference
        marks.append([] if plain else [m for m in placeholder_marks(tok, caption, length) if m[1] < refs])
    return captions, marks


def packed_masks(masks: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject masks (B, 1, H, W; NaN where a reference has none) on the packed grid: (B, refs, tokens)
    and which are present (B, refs)."""
    stacked = torch.cat(masks, dim=1)  # (B, refs, H, W)
    present = ~torch.isnan(stacked).flatten(2).any(-1)
    small = torch.nn.functional.adaptive_avg_pool2d(torch.nan_to_num(stacked, 0.0), grid)
    return small.flatten(2), present


def predict(
    config: Config,
    bb: Any,
    trained: Trained,
    batch: dict[str, Any],
    cache: Any,
    step: int,
    sigma: torch.Tensor,
    gens: list[torch.Generator],
    plain_text: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """One denoiser call on the batch's targets noised to `sigma` (noise drawn from `gens`, one per sample),
    the references as tokens with the condition embeddings: (prediction, target latents, noise, placeholder
    marks). Probes collect while it runs. The target's and references' latents (the VAE mean) and the
    prompts come from `cache` where it holds them (`encode_items`)."""
    from diffbase.methods.dreamo.mechanism.conditions import added_after_x_embedder, pack_references
    from diffbase.methods.dreamo.mechanism.routing import Layout

    probes, device = trained.extras["probes"], bb.device
    if cache is not None and cache.latents is not None:
        latents = cache.tensors(batch, "pair")
        x0, refs = latents["target"], [latents[f"reference_{k}"] for k in range(len(batch["route_masks"]))]
    else:
        with torch.no_grad():
            x0 = B.encode_images(bb, batch["pixels"].to(device), sample=False)
            refs = [B.encode_images(bb, r.to(device), sample=False) for r in batch["references"]]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
    captions, marks = captions_and_marks(config, bb, batch, step, plain_text)
    cond = (
        cache.conditioning(captions) if cache is not None and cache.text is not None else B.encode_prompts(bb, captions)
    )
    grid = (x0.shape[-2] // 2, x0.shape[-1] // 2)
    tokens = pack_references(bb.pipe, refs, list(range(1, len(refs) + 1)), grid)
    noisy_count = grid[0] * grid[1]
    added = trained.call("dreamo")(
        noisy_count, list(zip(tokens.counts, tokens.indices, strict=True)), bb.denoiser.dtype
    )
    if probes is not None:
        probes.clear()
        probes.layout = Layout(cond["prompt_embeds"].shape[1], noisy_count, tokens.counts, marks)
        probes.collecting = True
    extra = B.Conditioning(tokens=tokens.tokens.expand(x0.shape[0], -1, -1), token_ids=tokens.ids)
    try:
        with added_after_x_embedder(bb.denoiser, added):
            t = B.model_timesteps(bb, sigma).to(device)
            pred = B.denoise(bb, B.add_noise(bb, x0, noise, sigma), t, cond,
                             guidance=config.training.objective.guidance, conditioning=extra)  # fmt: skip
    finally:
        if probes is not None:
            probes.collecting = False
    return pred, x0, noise, marks


def across_processes(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`counts` summed over the processes that train together, and how many they are (`counts` and 1 in one
    process). Every process computes the loss of its share of the global batch at the same step, so all of
    them get here together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts, 1
    counts = counts.detach().clone()
    dist.all_reduce(counts)
    return counts, dist.get_world_size()


def loss(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the three losses. Under several processes (DDP), the LoRA trains in the
    denoiser, which the loop calls through its wrapper (`bb.forward`), and the condition embeddings are
    called through theirs (`predict`), so DDP reduces the gradients of both. The routing and placeholder
    losses are means over the references with a mask and the samples with placeholders of the *global*
    batch: each process divides its sum by the count over all processes (times their number, as DDP
    averages), so N processes train what one process with N times the batch trains."""
    from diffbase.methods.dreamo.mechanism.routing import holder_terms, route_terms

    d, objective, probes = config.training.dreamo, config.training.objective, trained.extras["probes"]
    gens = [sample_generator(config.experiment.seed, step, i) for i in batch["index"]]
    h, w = batch["route_masks"][0].shape[-2:]  # the target's size (without pixels when the cache holds them)
    seq_len = B.image_seq_len(bb, (h // bb.pipe.vae_scale_factor, w // bb.pipe.vae_scale_factor))
    sigma = torch.cat(
        [sample_flow_sigmas(objective, 1, dict(bb.pipe.scheduler.config), seq_len, generator=g) for g in gens]
    )
    pred, x0, noise, marks = predict(config, bb, trained, batch, cache, step, sigma, gens)
    l_diff = diffusion_loss(pred, B.target(bb, x0, noise, sigma))
    terms = {"loss_diff": l_diff.detach()}
    total = d.lambda_diff * l_diff
    if probes is not None and probes.route:
        masks, present = packed_masks(batch["route_masks"], (x0.shape[-2] // 2, x0.shape[-1] // 2))
        zero = l_diff.new_zeros(())
        route = route_terms(probes, masks.to(bb.device), present.to(bb.device)) if d.lambda_route else (zero, zero)
        holder = holder_terms(probes) if d.lambda_holder and any(marks) else (zero, zero)
        counts, world = across_processes(torch.stack([route[1], holder[1]]).float().to(bb.device))
        if counts[0] > 0:
            l_route = route[0] / counts[0] * world
            total, terms["loss_route"] = total + d.lambda_route * l_route, l_route.detach()
        if counts[1] > 0:
            l_holder = holder[0] / counts[1] * world
            total, terms["loss_holder"] = total + d.lambda_holder * l_holder, l_holder.detach()
        probes.route.clear()
        probes.holder.clear()
    return total, terms


def encode_items(config: Config, bb: Any, dataset: Any, show_progress: bool = True) -> tuple[Any, Any]:
    """DreamO's cache. Per item, the target's latent and each reference's (the VAE mean, as the step encodes
    them), keyed by the item's files, the target size, the reference resolution and the VAE (items are encoded
    together only when their references have the same sizes); every caption with and without its placeholders
    (the plain-text samples' prompt) in the text cache, encoded with the placeholder tokens added."""
    from diffbase.data.cache import build_item_cache
    from diffbase.methods.dreamo.mechanism.data import strip_placeholders

    d = config.training.dreamo

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = bb.device
        out = {"target": B.encode_images(bb, batch["pixels"].to(device), sample=False)}
        for k, r in enumerate(batch["references"]):
            out[f"reference_{k}"] = B.encode_images(bb, r.to(device), sample=False)
        return out

    prompts = {p for r in dataset.records for p in (r.caption, strip_placeholders(r.caption))}
    tag = ("dreamo", tuple(d.size), d.reference_resolution)
    return build_item_cache(config, bb, dataset, tag, encode, prompts, show_progress,
                            group=lambda i: dataset.signature[i])  # fmt: skip


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    from diffbase.data.datasets import dataset_configs
    from diffbase.methods.dreamo.mechanism.data import DreamODataset, read_items

    d = config.training.dreamo
    placeholder_rows(bb, config.experiment.seed)  # before any caption is tokenized or cached
    items = [it for k, ds in enumerate(dataset_configs(config.data)) for it in read_items(Path(ds.path), k)]
    if not items:
        raise UserError("data.train_path: required, a DreamO metadata.jsonl (or data.datasets)")
    rng = random.Random(config.experiment.seed)
    fraction = config.training.validation.loss_split
    held = set(rng.sample(range(len(items)), round(len(items) * fraction))) if fraction > 0 else set()
    chosen = [it for i, it in enumerate(items) if (i in held) == held_out]
    if not chosen:
        return None
    stages = [] if held_out else list(d.stages)
    total = sum(s.steps for s in stages)
    if stages and total != config.training.max_steps:
        raise UserError(f"training.dreamo.stages: the stages' steps add up to {total}; "
                        f"training.max_steps is {config.training.max_steps}")  # fmt: skip
    data = DreamODataset(chosen, tuple(d.size), d.reference_resolution, config.experiment.seed,
                         config.data.on_bad_file, stages)  # fmt: skip
    data.accumulation = config.training.gradient_accumulation
    return data


@torch.no_grad()
def held_out_errors(
    config: Config, bb: Any, trained: Trained, held_out: Any, shift_references: int = 0
) -> dict[str, float]:
    """On held-out items at the fixed noise levels `training.validation.loss_timesteps` with fixed noise,
    placeholders kept: `val_loss`, the flow-matching loss, and `val_subject_x0`, reference fidelity without
    sampling: the mean absolute error of the predicted clean latent (x_t - sigma * v) inside the subjects'
    masks (the whole target where none is given). `shift_references` > 0 gives each item the references of
    the item that many places on (the control: how much of the fidelity comes from the references)."""
    from diffbase.training.objectives import diffusion_loss as mse

    losses, errors = [], []
    n = len(held_out)
    for i in range(n):
        item = held_out[i]
        if item is None:
            continue
        if shift_references:
            other = held_out[(i + shift_references) % n]
            item = item | {"references": other["references"]} if other is not None else item
        batch = held_out.collate([item])
        for j, s in enumerate(config.training.validation.loss_timesteps):
            sigma = torch.tensor([float(s)])
            gens = [torch.Generator().manual_seed(config.experiment.seed * 1000 + i * 10 + j)]
            pred, x0, noise, _ = predict(config, bb, trained, batch, None, 0, sigma, gens, plain_text=0.0)
            losses.append(float(mse(pred.float(), B.target(bb, x0, noise, sigma).float())))
            x_t = B.add_noise(bb, x0, noise, sigma)
            err = (x_t - sigma.to(x0) * pred.to(x0) - x0).abs().float().mean(1)  # (1, h, w)
            masks, present = packed_masks(batch["route_masks"], tuple(x0.shape[-2:]))
            region = (masks[present] > 0.5).any(0).reshape(err.shape) if bool(present.any()) else err >= 0
            errors.append(float(err[region].mean()))
    if trained.extras["probes"] is not None:
        trained.extras["probes"].clear()
    return {"val_loss": sum(losses) / max(len(losses), 1), "val_subject_x0": sum(errors) / max(len(errors), 1)}


def validate(config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]) -> Validation:
    """Held-out items generated with the weights being trained: a grid (references | result | target), the
    L1 between result and target inside each reference's subject mask (`val_subject_l1`; the whole image
    where no mask is given), the held-out loss, the denoiser's error in the subjects (held_out_errors) and
    training.validation.metrics (ssim / psnr / lpips against the targets, clip_i / dino against the
    references, clip_t against the captions)."""
    from diffbase.methods.dreamo.mechanism.evaluate import held_out_samples, samples_grid

    held_out, _ = validation
    if held_out is None:
        return Validation()
    samples = held_out_samples(config, bb, trained.modules["dreamo"], held_out)
    results = [s["result"] for s in samples]
    l1 = [s["subject_l1"] for s in samples]
    metrics = {"val_subject_l1": sum(l1) / len(l1) if l1 else float("nan")}
    metrics |= paired_metrics(config, results, [s["target"] for s in samples])
    captions = [" ".join(re.sub(r"\[ref#\d+\]", " ", s["caption"]).split()) for s in samples]  # CLIP reads words
    metrics |= reference_metrics(config, results, [s["references"] for s in samples], captions)
    return Validation(samples_grid(samples), metrics | held_out_errors(config, bb, trained, held_out))


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    from peft.utils import get_peft_model_state_dict

    from diffbase.methods.dreamo.mechanism.files import write_dreamo_file
    from diffbase.models.lora_formats import peft_scales
    from diffbase.models.placement import cpu_state

    denoiser, emb = bb.denoiser, trained.modules["dreamo"]
    lora = cpu_state({f"transformer.{k}": v for k, v in get_peft_model_state_dict(denoiser).items()})
    tensors = cpu_state({"t5": emb.t5.weight, "task": emb.task.weight, "idx": emb.idx.weight})
    dtype = denoiser.dtype
    path = write_dreamo_file(out_dir / "dreamo" / "dreamo.safetensors", {k: v.to(dtype) for k, v in lora.items()},
                             peft_scales(denoiser, "transformer"), {k: v.to(dtype) for k, v in tensors.items()})  # fmt: skip
    return {"dreamo": str(path)}


def load(
    model: str, dreamo: str, version: str = "v1.1", turbo: str | None = None, use_turbo: bool = True, **runtime: Any
) -> tuple[Any, Any]:
    """A FLUX.1 pipeline with the DreamO LoRAs fused (before quantizing and offload hooks) and the placeholder
    tokens added: (pipe, embeddings). Turbo: `turbo` (a file), else the DreamO folder's, unless `use_turbo`
    is False (mechanism.files.turbo_file)."""
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings
    from diffbase.methods.dreamo.mechanism.files import fuse_dreamo, turbo_file
    from diffbase.models.loading import load_pipeline
    from diffbase.models.placement import execution_device

    tensors: dict[str, torch.Tensor] = {}

    def prepare(pipe: Any, spec: Any) -> None:
        families.require(
            spec.pipeline,
            "FluxPipeline",
            f"--model: DreamO runs on a FLUX.1 text-to-image folder; {model} holds a {spec.pipeline}",
        )
        tensors.update(fuse_dreamo(pipe, Path(dreamo), version, turbo_file(Path(dreamo), turbo, use_turbo)))

    pipe, _ = load_pipeline(model, **runtime, prepare=prepare)
    emb = DreamOEmbeddings.for_pipe(pipe)
    with torch.no_grad():
        for name in ("t5", "task", "idx"):
            getattr(emb, name).weight.copy_(tensors[name])
    return pipe, emb.to(execution_device(pipe), pipe.transformer.dtype)


def run(loaded: tuple[Any, Any], inputs: dict[str, Any], settings: Any) -> Any:
    """One image. `inputs["references"]`: (PIL image, task, optional mask, optional face box) per slot, None
    for an empty slot (it still counts for the index); `inputs["resolution"]`: the reference resolution."""
    from diffbase.methods.dreamo.mechanism.generate import Reference, dreamo_generate
    from diffbase.methods.dreamo.mechanism.preprocess import prepare_reference

    pipe, emb = loaded
    slots = inputs["references"]
    if len(slots) > 9:
        raise UserError(f"--ref: {len(slots)} references; DreamO takes at most 9")
    refs = [
        Reference(prepare_reference(img, task, inputs.get("resolution", 512), mask, box), task, k + 1)
        for k, slot in enumerate(slots) if slot is not None for img, task, mask, box in [slot]
    ]  # fmt: skip
    return dreamo_generate(pipe, emb, refs, settings)


DREAMO = register(
    Method(
        name="dreamo",
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=dataset,
        validate=validate,
        metrics=PAIRED_METRICS + REFERENCE_METRICS,
        section=("dreamo", DreamOConfig),
        cache=encode_items,
        load=load,
        run=run,
        describe="DreamO: reference tokens, condition embeddings and a LoRA, with routing and placeholder losses",
    )
)


def check_prompt(prompt: str, slots: list[Any], name: str = "--prompt") -> None:
    """Every [ref#N] in the prompt names a slot (an error past the last one; a note for an empty one). A
    style reference without the official prefix gets a note: the prompt is used as written, as officially."""
    from diffbase.methods.dreamo.mechanism.conditions import STYLE_PREFIX

    given = ", ".join(f"[ref#{k}]" for k, s in enumerate(slots, 1) if s is not None)
    for n in sorted({int(m) for m in re.findall(r"\[ref#(\d+)\]", prompt)}):
        if not 1 <= n <= len(slots):
            raise UserError(f"{name}: [ref#{n}] names no reference (given: {given})")
        if slots[n - 1] is None:
            from diffbase.interface.checks import note

            note(f"{name}: [ref#{n}] names an empty slot")
    if any(s is not None and s[1] == "style" for s in slots) and not prompt.startswith(STYLE_PREFIX):
        from diffbase.interface.checks import note

        note(f"{name}: a style reference works when the prompt begins with '{STYLE_PREFIX}' (the official guide)")
