"""Atomic file writes: a temporary file in the same folder, then rename, so nothing is half-written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from diffbase.errors import UserError


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def default_mode(path: Path) -> None:
    """The mode a plain `open()` or `mkdir()` would have given (temporary files are made owner-only):
    results on a shared GPU box or a mounted volume stay readable by others, as the umask says."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def default_modes(root: Path) -> None:
    """`default_mode` for a file, or a folder and everything in it (libraries such as safetensors write
    owner-only files too)."""
    default_mode(root)
    if root.is_dir():
        for path in root.rglob("*"):
            default_mode(path)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path onto `path`. On failure `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        default_mode(tmp_path)
        os.replace(tmp_path, path)
    except Exception as exc:
        if disk_full(exc, path.parent):  # libraries (safetensors, torch.save) raise their own types, no path
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for a full disk: the error says so (errno ENOSPC, or safetensors'
    wording), or, since torch.save reports it only as "unexpected pos", the disk has under 1 MiB free."""
    if is_disk_full(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it came from) says the disk is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def atomic_folder(out: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to fill; renamed onto `out` (an empty folder, or any with
    `replace`) when the block ends without an error, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        default_modes(tmp)
        if out.exists():
            shutil.rmtree(out) if replace else out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_png_atomic(image: Any, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save a PIL image as PNG with text metadata (JSON under `diffbase`, A1111-style `parameters`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata:
        info.add_text("diffbase", json.dumps(metadata, sort_keys=True))
        prompt = metadata.get("prompt", "")
        rest = ", ".join(f"{k}: {v}" for k, v in metadata.items() if k not in ("prompt", "negative"))
        negative = f"Negative prompt: {metadata['negative']}" if metadata.get("negative") else ""
        info.add_text("parameters", "\n".join(part for part in (prompt, negative, rest) if part))
    return atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def save_image_atomic(image: Any, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """An image in the format its suffix names: PNG with its settings as text metadata, else JPEG or WebP
    (quality 95)."""
    path = Path(path)
    kind = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower())
    if kind is None:
        return save_png_atomic(image, path, metadata)
    return atomic_write(path, lambda p: image.convert("RGB").save(p, format=kind, quality=95))


def writable_folder(path: str | Path, name: str) -> Path:
    """An output folder a command fills, checked before its work starts, so a read-only place, a file in the
    way or a typo'd top-level folder is one line naming `name` (the flag), not a traceback after the work.
    The folder itself is made when the first file is written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{name}: {out} is a file; expected a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{name}: {existing} is not a folder")
    if out.is_absolute() and existing != out and existing.parent == existing:  # a new top-level folder: a typo
        # (a relative path is where the user works, the root included: a container's WORKDIR often is)
        raise UserError(f"{name}: the folder {out} does not exist (diffbase makes missing folders, but not at "
                        "the filesystem's root)")  # fmt: skip
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffbase-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{name}: cannot write in {existing} ({exc.strerror})") from None
    return out
