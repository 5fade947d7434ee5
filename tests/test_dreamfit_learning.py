"""DreamFit training on the embedded default transfers the garment: on held-out people and garments
(try-on mode, a prompt that names no garment) the masked-region error falls clearly below both the
untrained LoRAs (step 0) and a run with the banks switched off."""

from __future__ import annotations

from pathlib import Path

import torch

from diffbase.config import configs_dir, load_config
from diffbase.data.datasets import to_pil, to_tensor
from diffbase.data.synthetic import write_dataset
from diffbase.demo import eval_set
from diffbase.methods import train
from diffbase.methods.dreamfit.mechanism.generate import DreamFitSettings, dreamfit_generate
from diffbase.methods.dreamfit.method import reference_pixels
from diffbase.methods.tryon.mechanism.metrics import masked_l1

TOY = Path(__file__).resolve().parents[1] / "src" / "diffbase" / "zoo_weights" / "flux1-toy"


def test_training_transfers_the_garment_through_the_banks(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", 400, 0, size=(32, 32))
    config = load_config(
        configs_dir() / "models" / "flux1_toy.yaml",
        [
            f"model.pretrained_path={TOY}",
            f"data.train_path={root}",
            "training.method=dreamfit",
            "training.dreamfit.mode=tryon",
            "training.dreamfit.size=[32,32]",
            "training.dreamfit.rank=8",
            "training.dreamfit.prompt=a person",
            "training.max_steps=200",
            "training.batch_size=8",
            "training.learning_rate=3e-3",
            "training.objective.guidance=4.0",
            "training.checkpoint_every=0",
            f"experiment.output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(config, show_progress=False)
    bb, data = result.backbone, eval_set(8)
    pipe, state = bb.pipe, result.trained.extras["banks"]
    pipe.set_progress_bar_config(disable=True)

    def error(banks: bool) -> float:
        images = []
        for k in range(8):
            settings = DreamFitSettings(
                prompt="a person", mode="tryon", steps=20, guidance=4.0, seed=k, height=32, width=32
            )
            if banks:
                batch = {
                    "person": data.person[k : k + 1],
                    "garment": data.garment[k : k + 1],
                    "person_mask": data.mask[k : k + 1],
                }
                image = dreamfit_generate(pipe, state, settings, to_pil(reference_pixels(batch, "tryon")[0]))
            else:
                state.mode = "off"
                image = pipe(
                    prompt="a person",
                    height=32,
                    width=32,
                    num_inference_steps=20,
                    guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(k),
                    max_sequence_length=32,
                ).images[0]
            images.append(to_tensor(image))
        return masked_l1(torch.stack(images), data.truth, data.mask).mean().item()

    trained, off = error(True), error(False)
    with torch.no_grad():
        for up in bb.adapters["dreamfit"].ups.values():
            up.zero_()
    step0 = error(True)
    assert trained < 0.8 * min(step0, off), (trained, step0, off)
