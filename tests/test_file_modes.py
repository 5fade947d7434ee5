"""Files diffbase writes keep the mode the umask gives (atomic writes go through owner-only temporary
files; on a shared GPU box or a mounted volume others must still read the results)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.helpers import SHAPES, run_cli


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_every_writer_keeps_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("zoo", "tiny", "sd15", str(tmp_path / "zoo"))
        assert code == 0, err
        code, _, err = run_cli(
            "train", "configs/experiments/tiny/sd15_lora.yaml", "training.max_steps=2", "training.checkpoint_every=1",
            "training.validation.steps=2", "data.cache_latents=true", "data.cache_text=true",
            f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path / 'run'}",
        )  # fmt: skip
        assert code == 0, err
        code, _, err = run_cli(
            "generate", "--model", str(tmp_path / "zoo"), "--prompt", "a cat", "--size", "32x32", "--steps", "2",
            "--out", str(tmp_path / "png" / "cat.png"),
        )  # fmt: skip
        assert code == 0, err
    finally:
        os.umask(old)
    found = modes(tmp_path)
    kinds = {".png", ".safetensors", ".json", ".pt", ".jsonl"}
    assert {Path(p).suffix for p in found} >= kinds  # images, weights, metadata, checkpoints, metrics
    wrong = {p: oct(m) for p, m in found.items() if m not in (0o644, 0o755)}
    assert not wrong, "\n".join(f"{p} {m}" for p, m in sorted(wrong.items()))
