"""Several processes (gloo on CPUs, started by torchrun) train exactly what one process with the
same global batch trains, and their checkpoints resume in a single process: the LoRA trainer, and the
methods whose trained parameters act from inside the frozen backbone (DreamO, DreamFit, the upscaler's
DINO adapter)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.golden_record import LOSS_RTOL, assert_weights_close
from tests.helpers import (
    MULTI_REFERENCE,
    ROOT,
    SHAPES,
    checkpoint_tensors,
    free_port,
    launch_runs,
    logged,
    run_cli,
    write_experiment,
)
from tests.images import image_folder

COMMON = (
    "training.schedule.type=constant",
    "training.learning_rate=1e-2",
    "training.lora.rank=4",
    "hardware.device=cpu",
)
STEPS = 4
TINY = ROOT / "configs" / "experiments" / "tiny"


def torchrun(*runs: list[str]) -> None:
    """`diffbase train` with each run's arguments, one after the other in the same 2 processes (one start-up)."""
    launch_runs(["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())], runs, 300,
                "torchrun")  # fmt: skip


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal as far as Adam lets two gradient reduction orders agree (4 steps at lr 1e-2; tests/golden_record.py)."""
    assert set(a) == set(b)
    for key in a:
        assert_weights_close(a[key], b[key], lr=1e-2, steps=STEPS, what=key)


def test_two_processes_equal_one_with_twice_the_batch_and_their_checkpoint_resumes_in_one(
    tiny_model, tmp_path: Path
) -> None:
    data = image_folder(tmp_path / "data", 4)
    exp = write_experiment(tmp_path / "exp.yaml", "sd15", tiny_model("sd15"), data, tmp_path / "two")
    torchrun([str(exp), "training.batch_size=1", "training.max_steps=4", "training.checkpoint_every=2", *COMMON])
    code, _, err = run_cli(
        "train",
        str(exp),
        "training.batch_size=2",
        "training.max_steps=4",
        f"experiment.output_dir={tmp_path / 'one'}",
        *COMMON,
    )
    assert code == 0, err
    two, one = lora(tmp_path / "two"), lora(tmp_path / "one")
    assert all(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # it did train
    assert_same_weights(two, one)

    # the step-2 checkpoint the two processes saved, resumed by one process, ends where both runs ended
    (tmp_path / "two" / "lora").rename(tmp_path / "two-lora")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000004")
    code, _, err = run_cli(
        "train", str(exp), "training.batch_size=2", "training.max_steps=4", "--resume", "latest", *COMMON
    )
    assert code == 0, err
    assert_same_weights(lora(tmp_path / "two"), one)


# The methods whose trained parameters act inside the frozen FLUX.1 (attention processors, hooks, extra tokens):
# their tiny experiments (DreamFit has none: the tiny FLUX.1 on 4 synthetic try-on pairs), each with its data.
def experiments(root: Path) -> dict[str, tuple[Path, list[str]]]:
    from diffbase.data.synthetic import write_dataset

    pairs = write_dataset(root / "pairs", 4, 0, size=(32, 32))
    dreamfit = root / "flux1_dreamfit.yaml"
    dreamfit.write_text(f"_base_: [{ROOT / 'configs' / 'models' / 'flux1_tiny.yaml'}]\n"
                        "training: {method: dreamfit, dreamfit: {mode: tryon, size: [32, 32], rank: 4}}\n")  # fmt: skip
    dino = ROOT / "src" / "diffbase" / "zoo_weights" / "dinov2-tiny"
    return {
        "dreamo": (TINY / "flux1_dreamo.yaml", [f"data.train_path={MULTI_REFERENCE}"]),
        "dreamfit": (dreamfit, [f"data.train_path={pairs}"]),
        "upscale_dino": (
            TINY / "flux1_upscale_dino.yaml",
            [f"data.train_path={SHAPES}", f"training.upscale.dino_path={dino}"],
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[Path, list[str]]]]:
    """The three methods trained by 2 processes at batch 1 each (one torchrun), checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("methods")
    exps = experiments(root)
    torchrun(*[[str(exp), *data, f"experiment.output_dir={root / name / 'two'}", "training.batch_size=1",
                f"training.max_steps={STEPS}", "training.checkpoint_every=2", *COMMON]
               for name, (exp, data) in exps.items()])  # fmt: skip
    return root, exps


@pytest.mark.parametrize("name", ["dreamo", "dreamfit", "upscale_dino"])
def test_method_in_two_processes_equals_one_with_twice_the_batch_and_resumes_in_one(name: str, two_processes) -> None:
    root, exps = two_processes
    exp, data = exps[name]
    run = root / name

    def train(out: Path, *extra: str) -> None:
        code, _, err = run_cli("train", str(exp), *data, f"experiment.output_dir={out}", "training.batch_size=2",
                               f"training.max_steps={STEPS}", *COMMON, *extra)  # fmt: skip
        assert code == 0, err

    train(run / "one")
    two, one = checkpoint_tensors(run / "two", STEPS), checkpoint_tensors(run / "one", STEPS)
    started_at_zero = [v for k, v in one.items() if any(z in k for z in ("lora_B", "ups.", "task", "net.3."))]
    assert started_at_zero and any(v.abs().max() > 0 for v in started_at_zero)  # it did train
    assert_same_weights(two, one)
    assert logged(run / "two", "loss") == pytest.approx(logged(run / "one", "loss"), rel=LOSS_RTOL)

    # the step-2 checkpoint of the two processes, resumed by one process, ends where both runs ended
    shutil.rmtree(run / "two" / "checkpoints" / f"step-{STEPS:06d}")
    train(run / "two", "--resume", "latest")
    assert_same_weights(checkpoint_tensors(run / "two", STEPS), one)
