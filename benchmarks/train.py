"""Training-loop overhead and the cache's effect, on a small SD1.5 model, in one process.

1. Our loop (`diffbase.training`) against a minimal hand-written diffusers-style LoRA loop in this
   file: same model, same LoRA layers, same data read from disk, same batch size and optimizer.
   Reported as our steps/s over theirs (goal >= 0.95), median over interleaved repeats.
2. Epoch time with cached latents and prompts over epoch time without (the cache is built first).

Ratios only: this machine is noisy, and absolute times mean something only on a GPU.
python benchmarks/train.py [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffbase.config import Config, configs_dir, load_config
from diffbase.methods import train

RESOLUTION, BATCH = 128, 4
# A small SD1.5 UNet that is still mostly matrix work (the tiny test config is all overhead).
UNET = [
    "model.unet.block_out_channels=[64,128]",
    "model.unet.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]",
    "model.unet.attention_head_dim=8",
    "model.unet.norm_num_groups=32",
]


def write_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a picture number {i}")
    return folder


def experiment(data: Path, out: Path, steps: int, *extra: str) -> Config:
    return load_config(
        configs_dir() / "models" / "sd15_tiny.yaml",
        [
            *UNET,
            f"data.train_path={data}",
            f"experiment.output_dir={out}",
            f"data.resolution={RESOLUTION}",
            f"training.batch_size={BATCH}",
            f"training.max_steps={steps}",
            "training.checkpoint_every=0",
            "training.lora.rank=8",
            "training.learning_rate=1e-4",
            "training.schedule.type=constant",
            "training.objective.timestep_sampling=uniform",
            *extra,
        ],
    )


def steps_per_second(times: list[float], warmup: int = 2) -> float:
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def ours(config: Config) -> float:
    result = train(config, show_progress=False)
    return steps_per_second(result.step_times)


def hand_written(config: Config) -> float:
    """What a diffusers training example does, with nothing else: read, encode, noise, predict, step."""
    from peft import LoraConfig

    from diffbase.methods.lora import lora_target_names
    from diffbase.models import families
    from diffbase.training.train import load_backbone

    pipe = load_backbone(config).pipe
    unet, vae, text_encoder, tokenizer, scheduler = (
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler,
    )
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=lora_target_names(unet, list(families.get("sd15").lora_targets)),
        )
    )
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    files = sorted(Path(config.data.train_path).glob("*.png"))
    times = []
    for step in range(config.training.max_steps):
        chosen = [files[(step * BATCH + j) % len(files)] for j in range(BATCH)]
        pixels = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(
                    2, 0, 1
                )
                for f in chosen
            ]
        ).contiguous()  # as diffusers' train_text_to_image (contiguous_format); the permuted numpy view would run
        # the UNet channels-last, faster on a CPU, and compare layouts instead of loops
        captions = [f.with_suffix(".txt").read_text() for f in chosen]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, embeds).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return steps_per_second(times)


def main(steps: int = 30, repeats: int = 5) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_images(root / "data", 16)
        loop_ratios = []
        for r in range(repeats):
            theirs = hand_written(experiment(data, root / f"hand{r}", steps))
            mine = ours(experiment(data, root / f"ours{r}", steps))
            loop_ratios.append(mine / theirs)
        epoch = 16 // BATCH * 3  # three epochs of the 16 images
        cache = [f"data.cache_dir={root / 'cache'}", "data.cache_latents=true", "data.cache_text=true"]
        train(experiment(data, root / "warm", 1, *cache), show_progress=False)  # build the cache once
        cache_ratios = []
        for r in range(repeats):
            plain = ours(experiment(data, root / f"plain{r}", epoch))
            cached = ours(experiment(data, root / f"cached{r}", epoch, *cache))
            cache_ratios.append(plain / cached)  # epoch-time ratio cached/plain = rate ratio plain/cached
    print("| measure | value |\n|---|---|")
    print(
        f"| SD1.5-small LoRA, {RESOLUTION}px, batch {BATCH}: our steps/s over a hand-written loop, median of "
        f"{repeats} | {statistics.median(loop_ratios):.3f} (goal >= 0.95; all: "
        f"{', '.join(f'{x:.3f}' for x in loop_ratios)}) |"
    )
    print(
        f"| epoch time with cached latents and prompts over without, median of {repeats} | "
        f"{statistics.median(cache_ratios):.3f} (all: {', '.join(f'{x:.3f}' for x in cache_ratios)}) |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.steps, args.repeats)
