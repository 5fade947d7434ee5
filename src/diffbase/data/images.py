"""Reading images of any size and mode as RGB, the way training expects them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class BadFile(Exception):
    """An image that cannot be used; `reason` is one line."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey images scaled to 8 bits (PIL's own convert would clip them)."""
    arr = np.asarray(img)
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    if img.mode == "F":
        peak = max(float(arr.max()), 1.0)
    return Image.fromarray(np.clip(arr.astype(np.float64) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, EXIF orientation applied."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header; raises BadFile. PIL's decompression-bomb
    limit is lifted for the header alone, so a large photo is reported by its size, against the caller's own
    limit, rather than as a bomb; decoding (load_image) keeps the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise BadFile(path, "file not found") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise BadFile(path, f"not a readable image ({type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise BadFile(path, "file not found") from None
    except Exception as exc:  # truncated or corrupt data shows up only when decoding
        raise BadFile(path, f"not a readable image ({type(exc).__name__})") from None


def load_mask(path: Path) -> Image.Image:
    """A binary mask (L mode, 0 or 255), white = the region that counts."""
    grey = load_image(path).convert("L")
    return grey.point(lambda v: 255 if v >= 128 else 0)
