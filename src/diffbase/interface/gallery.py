"""The web UI's results: every image a tab makes, kept on disk under the server's output folder
(`gallery/<session>/NNNN-<tab>.png`, its full settings in the PNG metadata, as `diffbase` commands write them)
with copies of its input pictures beside it (`inputs/<sha256>.png`), so its settings run again to the same
pixels. A session's list is gradio state; the files stay when the page closes; the uploads a session gave are
removed then (gradio's own copies in its temporary folder)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

from PIL import Image


def session_folder(session: str) -> str:
    """A folder name from gradio's session hash (letters and digits only)."""
    return "".join(c for c in session if c.isalnum())[:24] or "local"


class Gallery:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.uploads: dict[str, set[Path]] = {}  # per session: gradio's copies of what it uploaded

    def keep(self, value: Any, folder: Path) -> Any:
        """An input picture (a path, or a canvas: background and painted layers) copied by content."""
        if isinstance(value, dict):
            return {"background": self.keep(value.get("background"), folder),
                    "layers": [self.keep(x, folder) for x in value.get("layers") or [] if x], "composite": None}  # fmt: skip
        if not value or not Path(value).is_file():
            return None
        data = Path(value).read_bytes()
        target = folder / f"{hashlib.sha256(data).hexdigest()[:20]}{Path(value).suffix.lower() or '.png'}"
        if not target.is_file():
            from diffbase.io import atomic_write

            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        return str(target)

    def add(self, session: str, tab: str, title: str, image: Image.Image, settings: dict[str, Any],
            images: set[str]) -> dict[str, Any]:  # fmt: skip
        """Saves the result with its settings; the entry a session's list holds."""
        from diffbase.io import save_png_atomic

        folder = self.root / session_folder(session)
        kept = {k: self.keep(v, folder / "inputs") if k in images else plain(v) for k, v in settings.items()}
        with self.lock:
            self.uploads.setdefault(session, set()).update(uploaded(settings, images))
            folder.mkdir(parents=True, exist_ok=True)
            number = 1 + max((int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]-*.png")), default=0)
            path = folder / f"{number:04d}-{tab}.png"
            save_png_atomic(image, path, {"tab": tab, "title": title, "settings": kept})
        return {"path": str(path), "tab": tab, "title": title, "settings": kept}

    def shown(self, entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """What gr.Gallery shows: the newest first, captioned by tab."""
        return [
            (e["path"], f"{i}. {e['title']}")
            for i, e in reversed(list(enumerate(entries, 1)))
            if Path(e["path"]).is_file()
        ]

    def forget(self, session: str) -> None:
        """The session's uploads (gradio's temporary copies) removed when its page closes."""
        with self.lock:
            paths = self.uploads.pop(session, set())
        for path in paths:
            path.unlink(missing_ok=True)
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                shutil.rmtree(path.parent, ignore_errors=True)


def read(path: str | Path) -> dict[str, Any]:
    """A gallery image's entry from its PNG metadata."""
    with Image.open(path) as image:
        meta = json.loads(image.text.get("diffbase", "{}"))  # type: ignore[attr-defined]
    return {"path": str(path), "tab": meta.get("tab"), "title": meta.get("title"), "settings": meta.get("settings", {})}


def plain(value: Any) -> Any:
    """A field's value as JSON keeps it."""
    if isinstance(value, float) and value.is_integer():
        return value
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def uploaded(settings: dict[str, Any], images: set[str]) -> set[Path]:
    """The files of gradio's upload cache among the image inputs."""
    import os
    import tempfile

    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    found: set[Path] = set()
    for name in images:
        value = settings.get(name)
        paths = [value.get("background"), *(value.get("layers") or [])] if isinstance(value, dict) else [value]
        for p in paths:
            if p and Path(p).resolve().is_relative_to(cache):
                found.add(Path(p).resolve())
    return found
