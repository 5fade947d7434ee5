"""Several processes (gloo on CPUs, started by torchrun) train exactly what one process with the
same global batch trains, and their checkpoints resume in a single process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.golden_record import assert_weights_close
from tests.helpers import run_cli, write_experiment
from tests.images import image_folder

COMMON = (
    "training.schedule.type=constant",
    "training.learning_rate=1e-2",
    "training.lora.rank=4",
    "hardware.device=cpu",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(exp: Path, *overrides: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "diffbase.cli",
        "train",
        str(exp),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal as far as Adam lets two gradient reduction orders agree (4 steps at lr 1e-2; tests/golden_record.py)."""
    assert set(a) == set(b)
    for key in a:
        assert_weights_close(a[key], b[key], lr=1e-2, steps=4, what=key)


def test_two_processes_equal_one_with_twice_the_batch_and_their_checkpoint_resumes_in_one(
    tiny_model, tmp_path: Path
) -> None:
    data = image_folder(tmp_path / "data", 4)
    exp = write_experiment(tmp_path / "exp.yaml", "sd15", tiny_model("sd15"), data, tmp_path / "two")
    torchrun(exp, "training.batch_size=1", "training.max_steps=4", "training.checkpoint_every=2", *COMMON)
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
