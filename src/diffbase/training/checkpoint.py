"""Atomic checkpoints with the full training state, so `--resume latest` continues exactly.

A checkpoint is a folder `step-000123/` written under a temporary name and renamed when
complete; `state.json` inside is written last. A crash during a save leaves only a `.tmp-*`
folder, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffbase.errors import UserError
from diffbase.io import default_modes

NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, and batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """RNG states as (JSON-able python/numpy part, tensors), so no pickle is needed to restore them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def save_checkpoint(
    root: Path,
    progress: Progress,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    keep: int,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write `tensors` (safetensors files by name), `objects` (optimizer and lr-schedule state dicts,
    loaded back with `weights_only=True`) and the RNG states, move in `folders` (sharded optimizer
    states written by every process), then rename the folder into place."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{progress.step:06d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    for name, state in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(objects, tmp / "training_state.pt")
    for name, folder in (folders or {}).items():
        os.replace(folder, tmp / name)
    plain, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(plain))
    (tmp / "state.json").write_text(json.dumps(progress.__dict__, indent=2))
    default_modes(tmp)
    _fsync_dir(tmp)
    _fault_injection(progress.step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fault_injection(step: int) -> None:
    """For the crash test only: DIFFBASE_TEST_SLOW_SAVE_STEP=N holds the save of step N open for a minute,
    so a test can kill the process while a checkpoint is half-written."""
    if os.environ.get("DIFFBASE_TEST_SLOW_SAVE_STEP") == str(step):
        import time

        time.sleep(60)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """`latest` -> the newest complete checkpoint (or None if there is none); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume: {path} is not a complete checkpoint (no state.json)")
    return path


def load_checkpoint(path: Path) -> tuple[Progress, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Progress, tensors by file name, and objects; the RNG states are restored as a side effect."""
    from safetensors.torch import load_file

    progress = Progress(**json.loads((path / "state.json").read_text()))
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if p.stem != "rng"}
    objects = torch.load(path / "training_state.pt", weights_only=True)
    set_rng_state(json.loads((path / "rng.json").read_text()), load_file(str(path / "rng.safetensors")))
    return progress, tensors, objects
