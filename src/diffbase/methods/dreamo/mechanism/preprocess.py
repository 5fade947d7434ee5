"""Reference preprocessing per task, as the official app prepares its inputs.

- ip / tryon: the background replaced by white through the subject's mask used as alpha (the official
  app gets that mask from the BEN2 background remover; here the user gives it), then resized by area.
- id: the face crop. The official app detects, aligns and parses the face (facexlib) into a 512x512
  crop on white; here the face box is given and the crop is resized to 512x512. No area resize.
- style: resized by area; the prompt is left as written (the official code never adds STYLE_PREFIX; its
  app asks the user to write it).

Area resize: scale to about `resolution`^2 pixels, each side floored to a multiple of 16, with OpenCV's
INTER_AREA for shrinking and enlarging alike, as the official `resize_numpy_image_area` (PIL has no filter
that matches it: BOX differs when enlarging and by rounding when shrinking).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from diffbase.errors import UserError
from diffbase.methods.dreamo.mechanism.conditions import TASKS

FACE_SIZE = 512  # the official aligned face crop


def area_size(size: tuple[int, int], area: int) -> tuple[int, int]:
    """(width, height) scaled to about `area` pixels, each side floored to a multiple of 16."""
    w, h = size
    k = math.sqrt(area / (h * w))
    nh, nw = int(h * k) - int(h * k) % 16, int(w * k) - int(w * k) % 16
    if nh < 16 or nw < 16:
        raise UserError(f"a reference of {w}x{h} is too narrow for a {int(math.sqrt(area))} px reference resolution")
    return nw, nh


def resize_by_area(image: Image.Image, area: int) -> Image.Image:
    """`area_size` by cv2.INTER_AREA on the uint8 pixels: the official resize, bit for bit."""
    import cv2

    pixels = cv2.resize(np.asarray(image), area_size(image.size, area), interpolation=cv2.INTER_AREA)
    return Image.fromarray(pixels)


def on_white(image: Image.Image, mask: Image.Image) -> Image.Image:
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image.convert("RGB"), mask=mask.convert("L").resize(image.size, Image.BILINEAR))
    return white


def face_crop(image: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    """The box grown to a square around its centre (the whole image's centre square without a box),
    resized to the official 512x512."""
    w, h = image.size
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise UserError(f"face box {box}: expected x0,y0,x1,y1 inside the {w}x{h} image")
    side = min(max(x1 - x0, y1 - y0), w, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(cx - side / 2, 0), w - side))
    top = int(min(max(cy - side / 2, 0), h - side))
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((FACE_SIZE, FACE_SIZE), Image.BICUBIC)


def prepare_reference(
    image: Image.Image, task: str, resolution: int = 512, mask: Image.Image | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:  # fmt: skip
    if task not in TASKS:
        raise UserError(f"reference task '{task}': expected one of {', '.join(TASKS)}")
    if task == "id":
        return face_crop(image, box)
    image = image.convert("RGB")
    if mask is not None and task != "style":
        image = on_white(image, mask)
    return resize_by_area(image, resolution * resolution)
