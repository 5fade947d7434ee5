"""A training run's output folder: one run at a time (a lock that names its holder), what a run leaves
there, the temporary files of runs that died, and removing what a start that failed wrote.

The lock is an `flock` on `.diffbase.lock`, held for the whole run: the kernel drops it when its process
dies however it dies, so a lock left by a dead run is simply taken over. The file holds the holder's PID and
host (for the refusal's message) and is emptied on a clean release, so a non-empty file found unlocked was
left by a run that died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from diffbase.errors import UserError

LOCK_NAME = ".diffbase.lock"
# What a run leaves in its output folder (the cache and DreamBooth's class images are kept by --overwrite:
# they are keyed by content and reusable).
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "validation", "loss.png", "losses.json", "exports.json",
             "config.yaml", "exports", "wandb", "mlruns")  # fmt: skip
# Where a run writes through temporary names, and the names: `.NAME.XXXX.tmp` files (io.atomic_write),
# `.tmp-*` checkpoint folders, `.export-*` staging folders and `.old-*` exports being replaced (also in each
# exports/step-N), computed ControlNet controls (controls/<type>/). Only these
# places are cleaned: the cache may be shared with another command, and a folder may hold other runs.
TEMP_PLACES = {".": (".*.tmp", ".export-*", ".old-*"), "checkpoints": (".tmp-*",), "validation": (".*.tmp",),
               "exports": ("*/.*.tmp", "*/.export-*", "*/.old-*"), "controls": ("*/.*.tmp",)}  # fmt: skip


@dataclass
class RunFolder:
    """The locked output folder of one run, and what was there before it started."""

    path: Path
    fd: int
    created: bool  # the folder did not exist before this run
    before: set[str] = field(default_factory=set)  # RUN_FILES present at the start
    removed_temp: list[Path] = field(default_factory=list)


def holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().split()
    except OSError:
        return "unknown"
    return f"PID {text[0]} on {text[1]}" if len(text) >= 2 else "unknown"


def lock(out_dir: Path) -> RunFolder:
    """Take the folder's lock, or refuse with a line naming the run that holds it. Removes the temporary
    files left by runs that died (no other run can be writing here now)."""
    import fcntl

    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"experiment.output_dir: cannot write to {out_dir} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"experiment.output_dir: {out_dir} is in use by another training run ({holder(out_dir / LOCK_NAME)}); "
            "wait for it to end, or give another experiment.output_dir"
        ) from None
    except OSError as exc:  # a filesystem without locks (some network and FUSE mounts): run, and say so
        print(f"note: {out_dir} cannot be locked ({exc.strerror}); make sure no other run uses it")
    stale = holder(out_dir / LOCK_NAME)
    if stale != "unknown":
        print(f"note: took over the lock of a run that ended without releasing it ({stale})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    folder = RunFolder(out_dir, fd, created, {name for name in RUN_FILES if (out_dir / name).exists()})
    folder.removed_temp = remove_temporary(out_dir)
    return folder


def release(folder: RunFolder) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        os.ftruncate(folder.fd, 0)
        fcntl.flock(folder.fd, fcntl.LOCK_UN)
    os.close(folder.fd)


def remove_temporary(out_dir: Path) -> list[Path]:
    """The temporary files and folders that earlier runs in this folder left when they died mid-write."""
    found = sorted({p for place, patterns in TEMP_PLACES.items() for pattern in patterns
                    for p in (out_dir / place).glob(pattern)})  # fmt: skip
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def claim(folder: RunFolder, resume: str | None, overwrite: bool) -> None:
    """A new run does not silently overwrite an earlier one: continue it (--resume latest) or replace it
    (--overwrite, which removes the earlier run's files)."""
    found = sorted(folder.before, key=RUN_FILES.index)
    if not found or resume is not None:
        return
    if not overwrite:
        raise UserError(
            f"experiment.output_dir: {folder.path} already holds a run ({', '.join(found)}); continue it with "
            "--resume latest, or start over with --overwrite"
        )
    for name in found:
        path = folder.path / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.before = set()


def remove_failed_start(folder: RunFolder) -> None:
    """After a run failed with nothing to resume from (no checkpoint): remove the run files it wrote, so
    the same command can simply be run again. What was there before it started is left alone."""
    from diffbase.training.checkpoint import list_checkpoints

    if list_checkpoints(folder.path / "checkpoints"):
        return
    for name in RUN_FILES:
        path = folder.path / name
        if name not in folder.before and path.exists():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out_dir: Path, enabled: bool = True) -> Iterator[RunFolder | None]:
    """The output folder locked for the block (`enabled` False in processes other than the main one).
    A block that fails with nothing to resume removes what it wrote; the lock file goes with a folder
    the run created and left empty."""
    if not enabled:
        yield None
        return
    folder = lock(out_dir)
    try:
        yield folder
    except BaseException:
        remove_failed_start(folder)
        raise
    finally:
        if folder.created and {p.name for p in out_dir.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(out_dir, ignore_errors=True)  # before the lock is let go: no one can be in it
        release(folder)
