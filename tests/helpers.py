"""What several test files share: running the CLI in-process, the shipped example data, tiny experiment
configs and runs, and small model inputs. Test files import from here (and from images.py and
golden_record.py), never from each other."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffbase.config import Config, configs_dir, load_config

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "flux2-klein"]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from diffbase.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


SHAPES = ROOT / "examples" / "shapes"
EDITS = ROOT / "examples" / "edits" / "metadata.jsonl"
MULTI_REFERENCE = ROOT / "examples" / "dreamo" / "metadata.jsonl"
TINY_EXPERIMENTS = sorted((configs_dir() / "experiments" / "tiny").glob("*.yaml"))


def train_tiny(path: Path, out: Path, steps: int, *overrides: str) -> tuple[int, str, str]:
    """`diffbase train` on a tiny experiment with the shapes (the edit methods: the pairs in
    examples/edits; DreamO: examples/dreamo), no checkpoints, 2 validation steps."""
    method = load_config(path).training.method
    data = EDITS if method in ("kontext", "fill") else MULTI_REFERENCE if method == "dreamo" else SHAPES
    return run_cli(
        "train", str(path), f"training.max_steps={steps}", "training.checkpoint_every=0",
        "training.validation.steps=2", f"data.train_path={data}", f"experiment.output_dir={out}", *overrides,
    )  # fmt: skip


TINY_MODELS = {
    "sd15": "sd15_tiny",
    "sdxl": "sdxl_tiny",
    "sd3": "sd3_tiny",
    "flux1": "flux1_tiny",
    "flux2": "flux2_tiny",
    "flux2-klein": "flux2_klein_tiny",
}


def tiny_config(family: str, folder: Path, data: Path, out: Path, *overrides: str) -> Config:
    return load_config(
        configs_dir() / "models" / f"{TINY_MODELS[family]}.yaml",
        [
            f"model.pretrained_path={folder}",
            f"data.train_path={data}",
            f"experiment.output_dir={out}",
            "data.resolution=64",
            "training.batch_size=4",
            "training.checkpoint_every=0",
            "training.objective.timestep_sampling=uniform",
            *overrides,
        ],
    )


def write_experiment(path: Path, family: str, folder: Path, data: Path, out: Path, *lines: str) -> Path:
    base = configs_dir() / "models" / f"{TINY_MODELS[family]}.yaml"
    path.write_text(
        "\n".join(
            [
                f"_base_: [{base}]",
                "experiment: {output_dir: " + str(out) + "}",
                "model: {pretrained_path: " + str(folder) + "}",
                "data: {train_path: " + str(data) + ", resolution: 64}",
                "training: {batch_size: 2, max_steps: 6, checkpoint_every: 2, learning_rate: 1.0e-3}",
                *lines,
            ]
        )
        + "\n"
    )
    return path


def transformer_inputs(transformer, seed: int, tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    side = int(tokens**0.5)
    img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return {
        "hidden_states": torch.randn(1, tokens, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.cat([torch.zeros(tokens, 1), img_ids.float()], dim=1),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def dreamfit_checkpoint(tiny_model, tmp_path):
    from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, random_official, save_official
    from diffbase.models.loading import load_pipeline

    pipe, _ = load_pipeline(tiny_model("flux1"))
    return save_official(random_official(Dims.of(pipe.transformer), rank=4, seed=3), tmp_path / "flux_tryon.bin")


def dreamfit_config(tiny_model, tmp_path, *extra: str, pairs: int = 4):
    """DreamFit on the tiny FLUX.1 at 32x32, rank 4, batch 2, on `pairs` synthetic try-on pairs."""
    from diffbase.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "synth", pairs, 0, size=(32, 32))
    return load_config(
        configs_dir() / "models" / "flux1_tiny.yaml",
        [
            f"model.pretrained_path={tiny_model('flux1')}",
            f"data.train_path={root}",
            "training.method=dreamfit",
            "training.dreamfit.size=[32,32]",
            "training.dreamfit.rank=4",
            "training.batch_size=2",
            "training.checkpoint_every=0",
            f"experiment.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def first_transformer_call(pipe, **kwargs) -> dict:
    """The keyword arguments and output of the pipeline's first transformer call."""
    seen: dict = {}

    def hook(module, args, call_kwargs, out):  # noqa: ANN001
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("out", out[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a red shirt", num_inference_steps=1, height=32, width=32, max_sequence_length=32,
         generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    handle.remove()
    return seen


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `folder` with mount `options` (a small disk, a read-only one), unmounted after; the
    test is skipped where this machine cannot mount one (mounting needs root)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small or read-only filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def dreamo_embeddings(pipe, seed: int = 0):
    """DreamO embeddings for a pipeline, filled with a seed's noise."""
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings

    emb = DreamOEmbeddings.for_pipe(pipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return emb


def peft_lora(pipe, seed: int = 0) -> tuple[dict, dict]:
    """A random LoRA over the official layers on a copy of the transformer: (peft state with the
    `transformer.` prefix, scales)."""
    import copy

    from peft.utils import get_peft_model_state_dict

    from diffbase.methods.dreamo.mechanism.files import lora_modules
    from diffbase.methods.lora import LoraConfig, add_lora
    from diffbase.models.lora_formats import peft_scales

    t = copy.deepcopy(pipe.transformer)
    add_lora(t, "flux1", LoraConfig(rank=2, alpha=4, target_modules=lora_modules(t)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(t).items()}
    return state, peft_scales(t, "transformer")


def write_dreamo_folder(pipe, folder: Path) -> None:
    """A DreamO folder (dreamo.safetensors) with a random LoRA and embeddings for this pipeline."""
    from diffbase.methods.dreamo.mechanism.files import write_dreamo_file

    state, scales = peft_lora(pipe)
    emb = dreamo_embeddings(pipe)
    write_dreamo_file(folder / "dreamo.safetensors", state, scales,
                      {"t5": emb.t5.weight.detach(), "task": emb.task.weight.detach(), "idx": emb.idx.weight.detach()})  # fmt: skip


def tiny_dino(folder: Path) -> Path:
    """A random-weight DINOv2 folder (model and image processor), built locally: the feature network's plumbing."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                          image_size=28, patch_size=14)  # fmt: skip
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)  # fmt: skip
    return folder


def tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP folder (model, image processor, tiny tokenizer), built locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffbase.models.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok),
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder
