"""OpenPose skeletons: the COCO-18 limbs and colours, and a renderer for keypoint JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from diffbase.errors import UserError

# OpenPose COCO-18 limbs (0-based keypoint indices) and their usual colours.
OPENPOSE_LIMBS = [
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
]
OPENPOSE_COLOURS = [
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
]


def render_openpose(path: Path, size: tuple[int, int]) -> Image.Image:
    """An OpenPose keypoints JSON (people[0].pose_keypoints_2d, COCO-18) drawn as a skeleton on black."""
    try:
        data = json.loads(path.read_text())
        flat = data["people"][0]["pose_keypoints_2d"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"--pose: {path}: expected OpenPose JSON with people[0].pose_keypoints_2d") from None
    return draw_openpose(flat, size)


def draw_openpose(flat: list[float], size: tuple[int, int]) -> Image.Image:
    """Flat COCO-18 keypoints (x, y, confidence per point, as pose_keypoints_2d) drawn as a skeleton on black;
    points of confidence 0 are left out, as OpenPose writes undetected ones."""
    points = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, min(len(flat), 54), 3)]
    img = Image.new("RGB", size, (0, 0, 0))
    d = ImageDraw.Draw(img)
    width = max(1, size[0] // 100)
    for (a, b), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS, strict=True):
        if a < len(points) and b < len(points) and points[a][2] > 0 and points[b][2] > 0:
            d.line([points[a][:2], points[b][:2]], fill=colour, width=width * 2)
    for x, y, c in points:
        if c > 0:
            d.ellipse((x - width * 2, y - width * 2, x + width * 2, y + width * 2), fill=(255, 255, 255))
    return img
