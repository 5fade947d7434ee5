"""Try-on on SD1.5, CatVTON-style: person over garment in one canvas, only the self-attention (`attn1`)
trains. Two variants: `vton` (8 input channels, fixed text) and `catvton` (9 channels with the mask,
no text, cross-attention skipped). Exported as CatVTON's `attention` weight layout.

Per sample, one generator seeded by (seed, step, index) draws the latent samples, the garment dropout
(which trains the unconditional branch CFG uses), the timestep and the noise, so resume and
multi-process runs stay exact, as for every other method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, Validation, register
from diffbase.methods.tryon.mechanism import canvas as C
from diffbase.models import backbone as B
from diffbase.models import families
from diffbase.training.metrics import PAIRED_METRICS
from diffbase.training.objectives import diffusion_loss, min_snr_weights, sample_ddpm_timesteps
from diffbase.training.step import sample_generator
from diffbase.training.validation import paired_metrics


@dataclass
class TryOnConfig:
    """Attention-only try-on on SD1.5 (diffbase.methods.tryon.mechanism): person over garment in one canvas."""

    variant: Literal["vton", "catvton"] = "vton"  # 8 input channels, or CatVTON's 9 (with the mask, no text)
    size: list[int] = field(default_factory=lambda: [512, 384])  # person (and garment) height, width
    garment_dropout: float = 0.1  # trains the unconditional branch classifier-free guidance uses
    prompt: str = ""  # the fixed text of the vton variant (its cross-attention is frozen)
    steps: int = 50  # inference / validation sampling
    guidance: float = 2.5
    eta: float = 1.0
    mask_loss_weight: float = 1.0  # weight of the person's masked area in the loss (the rest of the canvas: 1)


def prepare(bb: Any, config: Config) -> Trained:
    from diffbase.methods.tryon.mechanism.vton import prepare_unet

    families.require(bb.family, "sd15", f"training.method: tryon trains an SD1.5 UNet, not {bb.family}")
    text_to_image.freeze(bb)
    params = prepare_unet(bb.denoiser, config.training.tryon.variant)
    return Trained({"denoiser": bb.denoiser}, params, attention_state_dict, load_attention_state_dict)


def attention_state_dict(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, Any]:
    """Only the parameters that train (the attn1 projections); the rest is the frozen base."""
    module = trained.modules["denoiser"]
    state = full["denoiser"] if full else module.state_dict()
    trains = {n for n, p in module.named_parameters() if p.requires_grad}
    return {"denoiser": {k: v.detach() for k, v in state.items() if k in trains}}


def load_attention_state_dict(trained: Trained, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    result = trained.modules["denoiser"].load_state_dict(tensors["denoiser"], strict=False)
    if result.unexpected_keys:
        raise UserError(f"checkpoint: unexpected keys for denoiser: {result.unexpected_keys[:3]}")


def canvas_batch(
    bb: B.Backbone, batch: dict[str, Any], generators: list[torch.Generator], cache: Any = None
) -> dict[str, torch.Tensor]:
    """Latent canvases of a batch: target (person over garment), masked (condition) and mask. From the
    cached posteriors when `cache` has them: the same draws, so the same loss."""
    if cache is not None and cache.latents is not None:
        e = cache.tensors(batch, "pair")
        z_person, z_masked, z_garment = (
            C.sample_posterior(bb, e[f"{name}_mean"], e[f"{name}_std"], generators)
            for name in ("person", "masked", "garment")
        )
        small = e["mask"]
    else:
        device = bb.device
        person, garment = batch["person"].to(device), batch["garment"].to(device)
        mask = batch["person_mask"].to(device)
        z_person = C.sample_latents(bb, person, generators)
        z_masked = C.sample_latents(bb, C.masked_person(person, mask), generators)
        z_garment = C.sample_latents(bb, garment, generators)
        small = C.latent_mask(mask, tuple(z_person.shape[-2:]))
    return {
        "target": C.stack(z_person, z_garment),
        "masked": z_masked,
        "garment": z_garment,
        "masks": C.stack(small, torch.zeros_like(small)),
    }


def encode_pairs(config: Config, bb: Any, dataset: Any, show_progress: bool = True) -> tuple[Any, Any]:
    """The try-on cache: per pair, the VAE posteriors (mean, std) of the person, the masked person and
    the garment, and the mask at latent size; training still draws a fresh sample every step. The
    vton variant's fixed prompt goes to the text cache."""
    from diffbase.data.cache import build_item_cache

    cfg = config.training.tryon

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = bb.device
        person, garment = batch["person"].to(device), batch["garment"].to(device)
        mask = batch["person_mask"].to(device)
        out = {}
        for name, pixels in (("person", person), ("masked", C.masked_person(person, mask)), ("garment", garment)):
            out[f"{name}_mean"], out[f"{name}_std"] = B.encode_distribution(bb, pixels)
        out["mask"] = C.latent_mask(mask, tuple(out["person_mean"].shape[-2:]))
        return out

    prompts = {cfg.prompt} if cfg.variant == "vton" else set()
    return build_item_cache(config, bb, dataset, ("vton", tuple(cfg.size)), encode, prompts, show_progress)


def loss(
    config: Config, bb: Any, trained: Trained, batch: dict[str, Any], cache: Any, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg, seed = config.training.tryon, config.experiment.seed
    unet = trained.call("denoiser")
    gens = [sample_generator(seed, step, i) for i in batch["index"]]
    c = canvas_batch(bb, batch, gens, cache)
    keep = torch.tensor([float(torch.rand((), generator=g) >= cfg.garment_dropout) for g in gens])
    cond = C.stack(c["masked"], c["garment"] * keep.view(-1, 1, 1, 1).to(c["garment"]))
    steps = bb.pipe.scheduler.config.num_train_timesteps
    t = torch.cat([sample_ddpm_timesteps(1, steps, generator=g) for g in gens]).to(bb.device)
    noise = torch.stack([torch.randn(c["target"].shape[1:], generator=g) for g in gens]).to(c["target"])
    noisy = B.add_noise(bb, c["target"], noise, t)
    text = None
    if cfg.variant == "vton":
        texts = trained.extras.setdefault("text", {})
        if cfg.prompt not in texts:
            cached = cache is not None and cache.text is not None
            texts[cfg.prompt] = (cache.conditioning([cfg.prompt]) if cached else B.encode_prompts(bb, [cfg.prompt]))[
                "prompt_embeds"
            ]
        text = texts[cfg.prompt].expand(len(gens), -1, -1)
    x = C.unet_input(cfg.variant, noisy, c["masks"], cond)
    pred = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
    weights = None
    if cfg.mask_loss_weight != 1.0:
        weights = 1.0 + (cfg.mask_loss_weight - 1.0) * c["masks"]
    gamma, per_sample = config.training.objective.snr_gamma, None
    if gamma is not None:
        per_sample = min_snr_weights(B.ddpm_alphas_cumprod(bb), t, gamma, B.prediction_kind(bb))
    return diffusion_loss(pred, B.target(bb, c["target"], noise, t), per_sample, mask=weights), {}


def pairs_dataset(config: Config, held_out: bool, size: list[int]) -> Any:
    """Try-on pairs (VITON-HD, DressCode or metadata.json), whole garments held out for validation."""
    from diffbase.methods.tryon.mechanism.data import TryOnDataset, read_tryon, split_pairs

    d = config.data
    if not d.train_path:
        raise UserError("data.train_path: required, the try-on dataset root or metadata file")
    records = read_tryon(d.train_path, "train")
    train_part, validation = split_pairs(records, config.training.validation.loss_split, config.experiment.seed)
    chosen = validation if held_out else train_part
    return TryOnDataset(chosen, tuple(size), config.experiment.seed, d.on_bad_file) if chosen else None


def dataset(config: Config, held_out: bool, bb: Any) -> Any:
    return pairs_dataset(config, held_out, config.training.tryon.size)


def validate(config: Config, bb: Any, trained: Trained, data: Any, validation: tuple[Any, Any]) -> Validation:
    """Held-out pairs: a grid (person | garment | result | ground truth), their masked-region L1 and
    training.validation.metrics (ssim, psnr, lpips against the ground truth)."""
    from diffbase.methods.tryon.mechanism.evaluate import tryon_validation

    held_out, _ = validation
    if held_out is None:
        return Validation()
    grid, out = tryon_validation(config, bb, held_out)
    metrics = {"val_masked_l1": out["metrics"].get("masked_l1", float("nan"))}
    truth = [k for k, paired in enumerate(out["paired"]) if paired]  # the reals of the others are the persons
    metrics |= paired_metrics(config, [out["results"][k] for k in truth], [out["reals"][k] for k in truth])
    return Validation(grid, metrics)


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    from diffbase.io import write_json_atomic
    from diffbase.methods.tryon.mechanism.vton import save_catvton_attention

    folder = save_catvton_attention(bb.denoiser, out_dir / "vton")
    info = {"variant": config.training.tryon.variant, "base": config.model.pretrained_path}
    write_json_atomic(out_dir / "vton" / "vton.json", info)
    return {"vton": str(folder)}


def load(model: str, weights: str | None = None, variant: str = "vton", **runtime: Any) -> B.Backbone:
    """An SD1.5 folder set up for the variant, with trained (or CatVTON's released) attention weights (put in
    on the CPU, before quantizing and placing)."""
    from diffbase.methods.tryon.mechanism.vton import load_catvton_attention, prepare_unet
    from diffbase.models.loading import load_pipeline

    if weights:
        info = Path(weights) / "vton.json"
        if info.is_file():
            trained = json.loads(info.read_text()).get("variant")
            if trained != variant:
                raise UserError(f"--weights: {weights} was trained as the {trained} variant; use --method {trained}")

    def prepare(pipe: Any, spec: Any) -> None:
        families.require(
            spec.family, "sd15", f"--model: try-on runs on an SD1.5 folder; {model} holds a {spec.family} model"
        )
        prepare_unet(pipe.unet, variant)
        if weights:
            load_catvton_attention(pipe.unet, Path(weights))
        pipe.unet.eval()

    pipe, spec = load_pipeline(model, **runtime, prepare=prepare)
    bb = B.Backbone(spec, pipe)
    bb.adapters["variant"] = variant
    return bb


def run(bb: B.Backbone, inputs: dict[str, Any], settings: Any, size: tuple[int, int], soften: bool = False) -> Any:
    """One try-on with CatVTON's geometry: `inputs` person, garment (RGB) and mask (L) PIL images. The
    person and mask are centre-cropped to the aspect of `size` (height, width), the garment fitted
    and padded with white; the result goes back into the person at its own size, the person's own
    pixels kept outside the mask when `settings.repaint`. `soften`: blur and re-binarise the mask."""
    from PIL import Image

    from diffbase.data.datasets import to_pil, to_tensor
    from diffbase.methods.tryon.mechanism import preprocess as P
    from diffbase.methods.tryon.mechanism.sampling import tryon

    h, w = size
    person, garment = inputs["person"].convert("RGB"), inputs["garment"]
    full_mask = P.soften_mask(inputs["mask"]) if soften else P.binarize(inputs["mask"])
    mask = P.binarize(P.crop_to_aspect(full_mask, (w, h)))
    tensors = [to_tensor(img)[None] for img in (P.crop_to_aspect(person, (w, h)), P.fit_and_pad(garment, (w, h)))]
    m = (to_tensor(mask)[None] > 0.5).float()
    result = P.paste_back(to_pil(tryon(bb, bb.adapters["variant"], *tensors, m, settings)[0]), person, (w, h))
    if settings.repaint:  # keep the person's own pixels outside the mask at full resolution
        result = Image.composite(result, person, full_mask.resize(person.size, Image.NEAREST))
    return result


VTON = register(
    Method(
        name="tryon",
        aliases=("vton",),
        prepare=prepare,
        loss=loss,
        export=export,
        dataset=dataset,
        validate=validate,
        metrics=PAIRED_METRICS,
        section=("tryon", TryOnConfig),
        cache=encode_pairs,
        load=load,
        run=run,
        describe="CatVTON-style try-on: only attn1 trains",
    )
)
