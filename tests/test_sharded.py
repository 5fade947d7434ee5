"""Sharded training in 2 CPU processes (gloo), started as a GPU run is, by `accelerate launch --config_file
configs/accelerate/fsdp.yaml` (FSDP2) or `deepspeed_zero2.yaml` (DeepSpeed ZeRO-2, when deepspeed is installed): the
tiny LoRA and full fine-tune experiments train, checkpoint, resume under the same launch and export; their losses and
weights equal one process with twice the batch. FSDP's checkpoints resume in one process and its exports load in a
plain `diffbase generate`; DeepSpeed's checkpoints resume under DeepSpeed only (one optimizer file per process)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.golden_record import LOSS_RTOL, assert_weights_close
from tests.helpers import ROOT, checkpoint_tensors, free_port, launch_runs, logged, run_cli

TINY = ROOT / "configs" / "experiments" / "tiny"
METHODS = {"lora": (TINY / "sd15_lora.yaml", 1e-2), "full_finetune": (TINY / "sd15_full_finetune.yaml", 1e-3)}
STEPS = 4
COMMON = ("hardware.device=cpu", "training.validation.prompts=[]", "training.checkpoint_every=2")
LAUNCH_CONFIGS = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}
SHOWN = {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}  # "training on 2 processes (...)"
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed)")  # fmt: skip


def launch(kind: str, *runs: list[str]) -> None:
    """`diffbase train` with each run's arguments, one after the other, in the same 2 processes of that launch."""
    out = launch_runs(["accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" /
                       LAUNCH_CONFIGS[kind]), "--num_processes", "2", "--mixed_precision", "no",
                       "--main_process_port", str(free_port())], runs, 400, "accelerate launch")  # fmt: skip
    assert out.count(f"training on 2 processes ({SHOWN[kind]})") == len(runs), out[-3000:]


def exported(run: Path) -> dict[str, torch.Tensor]:
    files = json.loads((run / "exports.json").read_text())
    path = Path(files["diffusers"] if "diffusers" in files else files["denoiser"])
    found = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {f"{f.name}/{k}": v for f in found for k, v in load_file(str(f)).items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    assert set(a) == set(b) and a
    for key in a:
        assert_weights_close(a[key], b[key], lr=lr, steps=STEPS, what=key)


def train_one(model: Path, name: str, out: Path, *extra: str) -> tuple[int, str]:
    """One process at batch 2 (the global batch of the 2 processes)."""
    code, _, err = run_cli("train", str(METHODS[name][0]), f"model.pretrained_path={model}",
                           f"experiment.output_dir={out}", "training.batch_size=2", f"training.max_steps={STEPS}",
                           *COMMON, *extra)  # fmt: skip
    return code, err


def launched(kind: str, root: Path, model: Path) -> Path:
    """Each method by 2 processes at batch 1 each: 2 steps, then resumed under the same launch to step 4."""
    runs = []
    for name, (exp, _) in METHODS.items():
        base = [str(exp), f"model.pretrained_path={model}", f"experiment.output_dir={root / name / kind}",
                "training.batch_size=1", *COMMON]  # fmt: skip
        runs += [[*base, "training.max_steps=2"], [*base, f"training.max_steps={STEPS}", "--resume", "latest"]]
    launch(kind, *runs)
    return root


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Each method by one process at batch 2, in ROOT/<method>/one."""
    root, model = tmp_path_factory.mktemp("sharded"), tiny_model("sd15")
    for name in METHODS:
        code, err = train_one(model, name, root / name / "one")
        assert code == 0, err
    return root, model


@pytest.fixture(scope="module")
def fsdp_runs(one_process: tuple[Path, Path]) -> tuple[Path, Path]:
    root, model = one_process
    return launched("fsdp", root, model), model


def generate(model: Path, out: Path, *extra: str) -> np.ndarray:
    code, _, err = run_cli("generate", "--model", str(model), "--prompt", "a red square on white", "--steps", "2",
                           "--size", "64x64", "--device", "cpu", "--quiet", "--out", str(out), *extra)  # fmt: skip
    assert code == 0, err
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def with_denoiser(model: Path, run: Path, out: Path) -> Path:
    """The base folder with the run's exported denoiser in place of its own."""
    shutil.copytree(model, out)
    denoiser = Path(json.loads((run / "exports.json").read_text())["denoiser"])
    shutil.rmtree(out / denoiser.name)
    shutil.copytree(denoiser, out / denoiser.name)
    return out


def assert_equals_one_process(run: Path, kind: str, lr: float) -> None:
    """The 2-process run (2 steps, resumed to 4) ends where one process with twice the batch ends."""
    assert_same_weights(checkpoint_tensors(run / kind, STEPS), checkpoint_tensors(run / "one", STEPS), lr)
    assert logged(run / kind, "loss") == pytest.approx(logged(run / "one", "loss"), rel=LOSS_RTOL)
    assert len(logged(run / kind, "loss")) == STEPS
    assert_same_weights(exported(run / kind), exported(run / "one"), lr)


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp_in_two_processes_equals_one_with_twice_the_batch_resumes_in_one_and_exports(
    name: str, fsdp_runs: tuple[Path, Path]
) -> None:
    root, model = fsdp_runs
    run, lr = root / name, METHODS[name][1]
    assert_equals_one_process(run, "fsdp", lr)
    # written in the layout one process writes (no per-process optimizer files)
    assert not list((run / "fsdp" / "checkpoints").glob("*/accelerate_state"))
    # the gradient norm is measured on the sharded parameters (the loop's list of them follows the sharding)
    assert all(g > 0 for g in logged(run / "fsdp", "grad_norm"))
    assert logged(run / "fsdp", "grad_norm") == pytest.approx(logged(run / "one", "grad_norm"), rel=1e-3)

    # the exports load in a plain single-process `generate`, and draw what the one-process exports draw
    if name == "lora":
        lora = "lora/pytorch_lora_weights.safetensors"
        fsdp_png = generate(model, run / "fsdp.png", "--lora", str(run / "fsdp" / lora))
        one_png = generate(model, run / "one.png", "--lora", str(run / "one" / lora))
        assert np.abs(one_png - generate(model, run / "base.png")).max() > 0  # the LoRA changes the picture
    else:
        fsdp_png = generate(with_denoiser(model, run / "fsdp", run / "fsdp-model"), run / "fsdp.png")
        one_png = generate(with_denoiser(model, run / "one", run / "one-model"), run / "one.png")
    assert np.abs(fsdp_png - one_png).max() <= 2

    # the FSDP step-2 checkpoint, resumed by one process, ends where both runs ended
    resumed = run / "fsdp-resumed"
    shutil.copytree(run / "fsdp" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    code, err = train_one(model, name, resumed, "--resume", "latest")
    assert code == 0, err
    assert_same_weights(checkpoint_tensors(resumed, STEPS), checkpoint_tensors(run / "one", STEPS), lr)


@needs_deepspeed
def test_deepspeed_zero2_in_two_processes_equals_one_with_twice_the_batch(one_process: tuple[Path, Path]) -> None:
    root, model = one_process
    launched("deepspeed", root, model)
    for name, (_, lr) in METHODS.items():
        run = root / name
        assert_equals_one_process(run, "deepspeed", lr)
        # its optimizer state is DeepSpeed's, one file per process: one process refuses it, saying how to resume
        resumed = run / "deepspeed-resumed"
        shutil.copytree(run / "deepspeed" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
        code, err = train_one(model, name, resumed, "--resume", "latest")
        assert code == 2 and "was saved by DeepSpeed" in err and "deepspeed_zero2.yaml" in err, err
