"""Small synthetic image folders for training tests (made with PIL, nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


def shape_image(seed: int, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, str]:
    rng = random.Random(seed)
    colour, bg = rng.choice(COLOURS), rng.choice(["white", "black", "gray"])
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (rng.randint(0, w // 3), rng.randint(0, h // 3), rng.randint(2 * w // 3, w), rng.randint(2 * h // 3, h))
    kind = rng.choice(["square", "circle"])
    (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=colour)
    return img, f"a {colour} {kind} on {bg}"


def image_folder(
    root: Path, n: int = 4, size: tuple[int, int] = (64, 64), control: bool = False, mask: bool = False
) -> Path:
    """n images with .txt captions; with control/mask, a metadata.json that names them too."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        img, caption = shape_image(i, size)
        img.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(caption)
        entry = {"image": f"{i:03d}.png", "caption": caption}
        if control:
            img.convert("L").point(lambda v: 255 if v > 100 else 0).convert("RGB").save(root / f"{i:03d}_c.png")
            entry["control"] = f"{i:03d}_c.png"
        if mask:
            m = Image.new("L", size, 0)
            ImageDraw.Draw(m).rectangle((0, 0, size[0] // 2, size[1]), fill=255)
            m.save(root / f"{i:03d}_m.png")
            entry["mask"] = f"{i:03d}_m.png"
        entries.append(entry)
    if control or mask:
        (root / "metadata.json").write_text(json.dumps(entries))
    return root
