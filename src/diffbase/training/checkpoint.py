"""Atomic checkpoints with the full training state, so `--resume latest` continues exactly.

A checkpoint is a folder `step-000123/` written under a temporary name and renamed when
complete; `manifest.json` inside, the sha256 of every other file, is written last. A crash during a
save leaves only a `.tmp-*` folder, which resume ignores and the next run removes. Resume verifies the
manifest: `latest` falls back to the newest intact checkpoint (saying which and why), a named damaged one
is refused.
"""

from __future__ import annotations

import errno
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
from diffbase.io import default_modes, disk_full, file_digest

NAME = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"


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
    """Checkpoint folders (renamed into place, so complete when written), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def write_manifest(folder: Path) -> None:
    """manifest.json: the sha256 and size of every file in the folder (sub-folders included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1, sort_keys=True))


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a file missing, cut short or changed), or None if intact."""
    if not (folder / "state.json").is_file():
        return "state.json is missing"
    try:
        entries = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:  # written before manifests: nothing to verify it against
        print(f"note: {folder} has no {MANIFEST} (written by an earlier diffbase); resuming it unverified")
        return None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{name} differs from what was written (sha256)"
    return None


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
    states written by every process), then rename the folder into place. A full disk is an OSError
    (ENOSPC) naming the checkpoint, with nothing of it left."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:06d}"
    tmp = root / f".tmp-{final.name}"  # this run's own (the output folder is locked; runs that died left theirs)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_folder(tmp, progress, tensors, objects, folders or {})
    except Exception as exc:
        if disk_full(exc, root):
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from exc
        raise
    hold_for_test("save", progress.step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_folder(
    tmp: Path,
    progress: Progress,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    folders: dict[str, Path],
) -> None:
    from safetensors.torch import save_file

    for name, state in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(objects, tmp / "training_state.pt")
    for name, folder in folders.items():
        os.replace(folder, tmp / name)
    plain, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(plain))
    (tmp / "state.json").write_text(json.dumps(progress.__dict__, indent=2))
    write_manifest(tmp)
    default_modes(tmp)
    _fsync_dir(tmp)


def hold_for_test(where: str, step: int) -> None:
    """For the fault tests only: DIFFBASE_TEST_HOLD=WHERE:STEP:FILE pauses the run at a known moment while
    FILE exists, after creating FILE.held, so a test can act on it there (kill it, signal it, start a second
    run, remove its images, fill its disk). WHERE: `save` (a checkpoint's files written, not yet renamed),
    `step` (after optimizer step STEP is logged), `export` (the method's files written, not yet moved)."""
    spec = os.environ.get("DIFFBASE_TEST_HOLD", "")
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != where or parts[1] != str(step):
        return
    import time

    release, deadline = Path(parts[2]), time.monotonic() + 600  # a test that died must not leave it forever
    Path(f"{release}.held").touch()
    while release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


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
    """`latest` -> the newest intact checkpoint (or None if there is none; damaged newer ones are named
    and skipped); a path -> that checkpoint, which must be intact."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            aside = path.with_name(f"damaged-{path.name}")  # kept to look at, and never pruned instead of a good one
            os.replace(path, aside)
            print(f"note: checkpoint {path} is damaged ({problem}); moved to {aside.name}, trying the one before it")
        if found:
            raise UserError(f"--resume latest: every checkpoint in {root} is damaged; start over with --overwrite")
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume: {path} is not a complete checkpoint (no state.json)")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"--resume: {path} is damaged ({problem}); resume from another checkpoint")
    return path


def load_checkpoint(path: Path) -> tuple[Progress, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Progress, tensors by file name, and objects; the RNG states are restored as a side effect."""
    from safetensors.torch import load_file

    progress = Progress(**json.loads((path / "state.json").read_text()))
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if p.stem != "rng"}
    objects = torch.load(path / "training_state.pt", weights_only=True)
    set_rng_state(json.loads((path / "rng.json").read_text()), load_file(str(path / "rng.safetensors")))
    return progress, tensors, objects
