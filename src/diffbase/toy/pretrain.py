"""`diffbase zoo pretrain sd15-toy OUT`: the toy SD1.5 of the embedded default, trained reproducibly.

Stages on synthetic training-split people and product shots (never on try-on pairs; the held-out
garment combinations are never drawn, though the hue-rotated copies of the later stages can come near
one, as a real base model has seen garments of every colour):

1. the VAE: L1 reconstruction with a small KL term; its scaling factor is then set so latents
   have unit spread, as SD's 0.18215 does for SD;
2. the UNet, in CatVTON's graph (9 channels, cross-attention skipped): text-free inpainting of
   garment areas, random boxes and whole images (DDPM epsilon, SD1.5's schedule);
3. (optional, `--decoder-steps`) the VAE decoder alone, the encoder and so the latent space frozen,
   on the same images with half of each batch hue-rotated: a codec should not depend on which
   colours its training garments happened to have (without it, the shipped decoder drew held-out
   yellow-and-black stripes as orange).

`--from DIR` continues an earlier result: `--unet-steps` more inpainting steps with half of each
batch hue-rotated, then `--decoder-steps`. The shipped toy is five runs (its pretrain.json):
1500 VAE + 4000 UNet steps, then 500 decoder steps, 1500 UNet steps, 1500 decoder steps and 2000
UNet steps, all but the first with hue rotation. On the demo's held-out set the later runs took
colour accuracy after try-on training from 67% to 73% to 75%, and the VAE alone (the truth encoded
and decoded) from 81% to 90% to 100%.

So the base knows people and garments and how to fill a hole, but not how to copy a garment from
another image: that is what try-on training teaches it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffbase.config import configs_dir, load_config
from diffbase.errors import UserError
from diffbase.io import atomic_folder

TOY_CONFIGS = {"sd15-toy": "sd15_toy.yaml", "flux1-toy": "flux1_toy.yaml"}
SIZE = 32


def image_pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n people, their garment masks, and n product shots, as tensors in [-1, 1] / {0, 1}."""
    from diffbase.data.datasets import to_tensor
    from diffbase.data.synthetic import make_item

    people, masks, shots = [], [], []
    for i in range(n):
        item = make_item(seed + 1000, "train", i, (SIZE, SIZE))
        people.append(to_tensor(item.person))
        masks.append((to_tensor(item.mask) > 0.5).float())
        shots.append(to_tensor(item.garment))
    return torch.stack(people), torch.stack(masks), torch.stack(shots)


def random_masks(n: int, g: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        x0, y0 = (int(v) for v in torch.randint(0, SIZE // 2, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(SIZE // 4, SIZE // 2 + 1, (2,), generator=g))
        masks[i, :, y0 : y0 + h, x0 : x0 + w] = 1
    return masks


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> Any:
    import math

    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x)


def fit_step(
    opt: Any, sched: Any, loss: torch.Tensor, losses: list[float], bar: Any, clip: list[Any] | None = None
) -> None:
    """Backward, optional clipping (of `clip`, to norm 1), step, schedule; the loss logged on the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")


def train_vae(vae: Any, images: torch.Tensor, steps: int, batch: int, seed: int, show: bool) -> list[float]:
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="pretrain vae", unit="step", disable=not show)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        if torch.rand((), generator=g) < 0.5:
            x = torch.flip(x, dims=[3])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        kl = dist.kl().mean() / z[0].numel()
        fit_step(opt, sched, reconstruction_loss(recon, x) + 1e-4 * kl, losses, bar)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images[:256]).latent_dist.mean
    if vae.config.get("shift_factor") is not None:  # FLUX-style (z - shift) * scale
        vae.register_to_config(shift_factor=round(latents.mean().item(), 5))
        latents = latents - latents.mean()
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    return losses


def hue_rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image (in [-1, 1]) rotated about the grey axis by a random angle: every hue, the same
    lightness structure."""
    import math

    out = []
    k = 1 / 3
    for img in x:
        a = float(torch.rand((), generator=g)) * 2 * math.pi
        c, s = math.cos(a), math.sin(a) * math.sqrt(k)
        m = torch.tensor(
            [
                [c + (1 - c) * k, k * (1 - c) - s, k * (1 - c) + s],
                [k * (1 - c) + s, c + k * (1 - c), k * (1 - c) - s],
                [k * (1 - c) - s, k * (1 - c) + s, c + k * (1 - c)],
            ]
        )
        out.append(torch.einsum("ij,jhw->ihw", m, (img + 1) / 2).clamp(0, 1) * 2 - 1)
    return torch.stack(out)


def train_decoder(vae: Any, images: torch.Tensor, steps: int, batch: int, seed: int, show: bool) -> list[float]:
    """The decoder alone (the encoder, and so every latent the UNet learned, unchanged), half of each
    batch hue-rotated."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=5e-4, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="pretrain decoder", unit="step", disable=not show)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        rotate = torch.rand(batch, generator=g) < 0.5
        x = torch.where(rotate.view(-1, 1, 1, 1), hue_rotate(x, g), x)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        fit_step(opt, sched, reconstruction_loss(recon, x), losses, bar)
    vae.eval().requires_grad_(False)
    return losses


def train_inpainting(
    pipe: Any, pool: tuple[torch.Tensor, ...], steps: int, batch: int, seed: int, show: bool, hue: bool = False
) -> list[float]:
    from tqdm import tqdm

    from diffbase.methods.tryon.mechanism import canvas as C
    from diffbase.methods.tryon.mechanism.vton import prepare_unet

    people, garment_masks, shots = pool
    unet = pipe.unet
    prepare_unet(unet, "catvton")
    unet.train().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=4e-4, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    alphas = pipe.scheduler.alphas_cumprod
    sf = pipe.vae.config.scaling_factor
    losses = []
    bar = tqdm(range(steps), desc="pretrain unet", unit="step", disable=not show)
    for _ in bar:
        idx = torch.randint(0, len(people), (batch,), generator=g)
        kind = torch.randint(0, 10, (batch,), generator=g)
        use_shot = kind >= 7  # 30% product shots, 70% people
        x = torch.where(use_shot.view(-1, 1, 1, 1), shots[idx], people[idx])
        if hue:  # half the batch in other colours: a base model has seen garments of every colour
            rotate = torch.rand(batch, generator=g) < 0.5
            x = torch.where(rotate.view(-1, 1, 1, 1), hue_rotate(x, g), x)
        mask = torch.where((kind < 4).view(-1, 1, 1, 1), garment_masks[idx], random_masks(batch, g))
        mask[kind == 6] = 1.0  # some whole-image generation
        with torch.no_grad():
            z = pipe.vae.encode(torch.cat([x, C.masked_person(x, mask)])).latent_dist
            z = (z.mean + z.std * torch.randn(z.mean.shape, generator=g)) * sf
        target, masked = z.chunk(2)
        mask_l = F.interpolate(mask, size=target.shape[-2:], mode="nearest")
        t = torch.randint(0, len(alphas), (batch,), generator=g)
        noise = torch.randn(target.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * target + (1 - a).sqrt() * noise
        pred = unet(torch.cat([noisy, mask_l, masked], dim=1), t, encoder_hidden_states=None).sample
        fit_step(opt, sched, F.mse_loss(pred, noise), losses, bar, clip=list(unet.parameters()))
    unet.eval().requires_grad_(False)
    return losses


def captioned_folder(folder: Path, n: int, seed: int) -> Path:
    """Synthetic training-split people and product shots with captions, for text-to-image."""
    from diffbase.data.synthetic import make_item

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        item = make_item(seed + 1000, "train", i, (SIZE, SIZE))
        item.person.save(folder / f"p{i:05d}.png")
        (folder / f"p{i:05d}.txt").write_text(item.caption)
        item.garment.save(folder / f"g{i:05d}.png")
        (folder / f"g{i:05d}.txt").write_text(f"a product shot of {item.spec.caption}")
    return folder


def train_text_to_image(pipe: Any, cfg: Any, work: Path, steps: int, n: int, seed: int, show: bool) -> list[float]:
    """Full fine-tuning of the denoiser with the training engine (flow matching, cached latents and
    prompts), starting from random weights; the trained weights replace the pipeline's."""
    import shutil

    from diffbase.config import load_config
    from diffbase.methods.full_finetune import FULL_FINETUNE
    from diffbase.models.backbone import Backbone
    from diffbase.models.specs import spec_for
    from diffbase.training.train import prepare_cache, run_training

    stage = work / "_stage"
    base = stage / "base"
    pipe.save_pretrained(base, safe_serialization=True)
    data = captioned_folder(stage / "data", n, seed)
    config = load_config(
        configs_dir() / "models" / f"{cfg.family}_toy.yaml",
        [
            f"model.pretrained_path={base}",
            f"data.train_path={data}",
            f"experiment.output_dir={stage / 'run'}",
            f"experiment.seed={seed}",
            "training.method=full_finetune",
            f"training.max_steps={steps}",
            "training.batch_size=16",
            "training.learning_rate=5e-4",
            "training.schedule.warmup_steps=100",
            "training.schedule.floor=1e-5",
            "training.checkpoint_every=0",
            "training.objective.timestep_sampling=logit_normal",
            f"data.resolution={SIZE}",
            "data.bucket_step=0",
            "data.cache_latents=true",
            "data.cache_text=true",
            "data.caption_dropout=0.1",
        ],
    )
    bb = Backbone(spec_for(cfg.family, cfg.variant), pipe)
    dataset = FULL_FINETUNE.dataset(config, False, bb)

    kept = {te.component: getattr(pipe, te.component) for te in bb.spec.text_encoders}
    vae_parts = {"encoder": pipe.vae.encoder, "decoder": pipe.vae.decoder}
    cache = prepare_cache(config, bb, [dataset], show)[0]  # frees the encoders, which the saved model needs back
    result = run_training(config, FULL_FINETUNE, bb, dataset, dataset.sampler(16), cache=cache, show_progress=show)
    pipe.vae.encoder, pipe.vae.decoder = vae_parts["encoder"], vae_parts["decoder"]
    pipe.register_modules(**kept)  # (plain setattr would leave model_index.json saying None)
    shutil.rmtree(stage, ignore_errors=True)
    return result.losses


def pretrain(
    name: str,
    out: Path,
    vae_steps: int,
    unet_steps: int,
    seed: int = 0,
    pool_size: int = 3000,
    show: bool = True,
    decoder_steps: int = 0,
    start: Path | None = None,
) -> Path:
    """Build the toy model from its config, train it, save it as a diffusers folder (fp16, atomically).
    With `start`, an earlier result is loaded instead and only the decoder stage runs."""

    from diffbase.models.build import build_pipeline

    if name not in TOY_CONFIGS:
        raise UserError(f"zoo pretrain: unknown toy model '{name}'; expected one of {sorted(TOY_CONFIGS)}")
    torch.manual_seed(seed)
    random.seed(seed)
    began = time.time()
    cfg = load_config(configs_dir() / "models" / TOY_CONFIGS[name]).model
    pool = image_pool(pool_size, seed)
    history: list[dict[str, Any]] = []
    if start is not None:
        from diffbase.models.loading import load_pipeline

        pipe, _ = load_pipeline(start, dtype="float32")
        record_file = Path(start) / "pretrain.json"
        earlier = json.loads(record_file.read_text()) if record_file.is_file() else {}
        history = earlier.pop("history", []) + [earlier] if earlier else []
        vae_losses = unet_losses = []
    else:
        pipe = build_pipeline(cfg, seed=seed)
        vae_losses = train_vae(pipe.vae, torch.cat([pool[0], pool[2]]), vae_steps, 32, seed, show)
    with atomic_folder(out, replace=True) as tmp:
        if start is None:
            if name == "sd15-toy":
                unet_losses = train_inpainting(pipe, pool, unet_steps, 32, seed + 1, show)
            else:
                unet_losses = train_text_to_image(pipe, cfg, tmp, unet_steps, pool_size, seed + 1, show)
        elif unet_steps and name == "sd15-toy":  # continued with every colour (hue rotation)
            unet_losses = train_inpainting(pipe, pool, unet_steps, 32, seed + 3, show, hue=True)
        decoder_losses = []
        if decoder_steps:
            decoder_losses = train_decoder(pipe.vae, torch.cat([pool[0], pool[2]]), decoder_steps, 32, seed + 2, show)
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        for config_file in [tmp / "model_index.json", *tmp.glob("*/config.json")]:  # no trace of `start`'s path
            data = json.loads(config_file.read_text())
            if data.pop("_name_or_path", None) is not None:
                config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        command = f"diffbase zoo pretrain {name} OUT --seed {seed} --pool {pool_size}"
        command += f" --from {start}" if start is not None else f" --vae-steps {vae_steps}"
        command += f" --unet-steps {unet_steps}"
        record = {
            "command": command + f" --decoder-steps {decoder_steps}",
            "seconds": round(time.time() - began, 1),
            "vae_loss_last100": float(np.mean(vae_losses[-100:])) if vae_losses else None,
            "unet_loss_last100": float(np.mean(unet_losses[-100:])) if unet_losses else None,
            "decoder_loss_last100": float(np.mean(decoder_losses[-100:])) if decoder_losses else None,
            "scaling_factor": pipe.vae.config.scaling_factor,
            "torch": torch.__version__,
        }
        if history:
            record["history"] = history  # the runs this one started from, oldest first
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
