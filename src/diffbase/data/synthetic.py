"""Synthetic try-on data, deterministic from a seed: people wearing patterned garments.

Each item has the person (wearing the garment), the flat garment product shot, the garment
mask, a pose skeleton render, a keep image (person with the garment area blacked out and the
skeleton drawn) and a caption. Train and held-out splits never share a (pattern, colour)
combination, so held-out garments are unseen combinations of seen patterns and colours.

Drawn at 4x and downsampled, so edges are smooth at any size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffbase.pose import OPENPOSE_COLOURS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "blue": (40, 80, 210),
    "green": (40, 160, 60),
    "yellow": (235, 205, 40),
    "purple": (130, 50, 170),
    "orange": (240, 130, 30),
    "pink": (240, 120, 180),
    "teal": (30, 160, 160),
}
PATTERNS = ("solid", "stripes", "checks", "dots", "logo")
KINDS = ("shirt", "dress")
SKINS = [(241, 194, 160), (224, 172, 125), (198, 134, 86), (141, 85, 54), (90, 56, 37)]
BACKGROUNDS = [(235, 235, 235), (210, 225, 240), (240, 228, 205), (215, 240, 215), (200, 200, 210)]
PANTS = (45, 45, 60)
SECOND = {"white": (250, 250, 250), "black": (20, 20, 20)}
SCALE = 4  # drawing supersampling


def held_out(pattern: str, colour: str) -> bool:
    """The held-out combinations: a fixed quarter of (pattern, colour) pairs, every pattern and
    colour still appearing in training with other partners."""
    return (PATTERNS.index(pattern) + list(COLOURS).index(colour)) % 4 == 0


def combinations(split: str) -> list[tuple[str, str]]:
    return [(p, c) for p in PATTERNS for c in COLOURS if held_out(p, c) == (split == "test")]


@dataclass(frozen=True)
class Garment:
    kind: str
    pattern: str
    colour: str
    second: str  # the pattern's second colour
    period: float  # pattern period, as a fraction of the image width

    @property
    def caption(self) -> str:
        kind = "t-shirt" if self.kind == "shirt" else "dress"
        pattern = {"solid": "plain", "stripes": "striped", "checks": "checked", "dots": "polka-dot", "logo": "logo"}
        return f"a {pattern[self.pattern]} {self.colour} {kind}"


@dataclass(frozen=True)
class Pose:
    arm_left: float  # arm angle from straight down, degrees (outwards positive)
    arm_right: float
    legs: float  # half the angle between the legs, degrees
    shift: float  # horizontal offset of the body, fraction of the width


@dataclass
class TryOnItem:
    person: Image.Image
    garment: Image.Image
    mask: Image.Image  # L, 255 where the garment is (dilated), on the person
    pose: Image.Image
    keep: Image.Image
    caption: str
    spec: Garment


def texture(g: Garment, size: tuple[int, int], origin: tuple[float, float], unit: float) -> Image.Image:
    """The garment's pattern over a whole canvas, anchored at `origin` with cells of `unit` pixels."""
    w, h = size
    c1, c2 = COLOURS[g.colour], SECOND[g.second]
    img = Image.new("RGB", size, c1)
    d = ImageDraw.Draw(img)
    ox, oy = origin
    if g.pattern == "stripes":
        y = oy - 40 * unit
        while y < h:
            d.rectangle((0, y, w, y + unit / 2), fill=c2)
            y += unit
    elif g.pattern == "checks":
        for i in range(-40, 40):
            for j in range(-40, 40):
                if (i + j) % 2 == 0:
                    x0, y0 = ox + i * unit / 2, oy + j * unit / 2
                    if -unit < x0 < w and -unit < y0 < h:
                        d.rectangle((x0, y0, x0 + unit / 2, y0 + unit / 2), fill=c2)
    elif g.pattern == "dots":
        for i in range(-40, 40):
            for j in range(-40, 40):
                cx, cy = ox + i * unit, oy + j * unit
                if -unit < cx < w + unit and -unit < cy < h + unit:
                    r = unit * 0.22
                    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c2)
    return img


def _logo(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    pts = [(cx + r * math.sin(a * math.pi / 180), cy - r * math.cos(a * math.pi / 180)) for a in range(0, 360, 72)]
    star = [pts[i] for i in (0, 2, 4, 1, 3)]
    d.polygon(star, fill=colour)


def body_points(w: float, h: float, pose: Pose) -> dict[str, tuple[float, float]]:
    cx = w * (0.5 + pose.shift)
    p = {
        "head": (cx, h * 0.14),
        "neck": (cx, h * 0.24),
        "l_shoulder": (cx - w * 0.17, h * 0.28),
        "r_shoulder": (cx + w * 0.17, h * 0.28),
        "l_hip": (cx - w * 0.09, h * 0.58),
        "r_hip": (cx + w * 0.09, h * 0.58),
    }
    arm = h * 0.32
    for side, angle, sign in (("l", pose.arm_left, -1), ("r", pose.arm_right, 1)):
        sx, sy = p[f"{side}_shoulder"]
        a = math.radians(angle)
        p[f"{side}_elbow"] = (sx + sign * math.sin(a) * arm / 2, sy + math.cos(a) * arm / 2)
        p[f"{side}_hand"] = (sx + sign * math.sin(a) * arm, sy + math.cos(a) * arm)
    leg = h * 0.36
    for side, sign in (("l", -1), ("r", 1)):
        hx, hy = p[f"{side}_hip"]
        a = math.radians(pose.legs)
        p[f"{side}_foot"] = (hx + sign * math.sin(a) * leg, hy + math.cos(a) * leg)
    return p


LIMBS = [
    ("neck", "l_shoulder"),
    ("neck", "r_shoulder"),
    ("l_shoulder", "l_elbow"),
    ("l_elbow", "l_hand"),
    ("r_shoulder", "r_elbow"),
    ("r_elbow", "r_hand"),
    ("neck", "l_hip"),
    ("neck", "r_hip"),
    ("l_hip", "l_foot"),
    ("r_hip", "r_foot"),
    ("head", "neck"),
]
LIMB_COLOURS = OPENPOSE_COLOURS[: len(LIMBS)]


def garment_shape(
    d: ImageDraw.ImageDraw,
    p: dict[str, tuple[float, float]],
    kind: str,
    w: float,
    h: float,
    fill: int | tuple[int, int, int] = 255,
) -> None:
    """The garment's silhouette on a body: torso, short sleeves, and a skirt for dresses."""
    ls, rs, lh, rh = p["l_shoulder"], p["r_shoulder"], p["l_hip"], p["r_hip"]
    pad = w * 0.03
    torso = [
        (ls[0] - pad, ls[1]),
        (rs[0] + pad, rs[1]),
        (rh[0] + pad, rh[1] + h * 0.02),
        (lh[0] - pad, lh[1] + h * 0.02),
    ]
    d.polygon(torso, fill=fill)
    for side in ("l", "r"):
        s, e = p[f"{side}_shoulder"], p[f"{side}_elbow"]
        mid = (s[0] + (e[0] - s[0]) * 0.8, s[1] + (e[1] - s[1]) * 0.8)
        d.line([s, mid], fill=fill, width=int(w * 0.11))
    if kind == "dress":
        y0, y1 = lh[1], lh[1] + h * 0.26
        d.polygon([(lh[0] - pad, y0), (rh[0] + pad, y0), (rh[0] + w * 0.12, y1), (lh[0] - w * 0.12, y1)], fill=fill)


def draw_body(img: Image.Image, p: dict[str, tuple[float, float]], skin: tuple[int, int, int]) -> None:
    d = ImageDraw.Draw(img)
    w, h = img.size
    for side in ("l", "r"):
        d.line([p[f"{side}_hip"], p[f"{side}_foot"]], fill=PANTS, width=int(w * 0.09))
        d.line([p[f"{side}_shoulder"], p[f"{side}_elbow"], p[f"{side}_hand"]], fill=skin, width=int(w * 0.07))
    ls, rs, lh, rh = p["l_shoulder"], p["r_shoulder"], p["l_hip"], p["r_hip"]
    d.polygon([ls, rs, rh, lh], fill=skin)
    hx, hy = p["head"]
    r = w * 0.085
    d.ellipse((hx - r, hy - r, hx + r, hy + r), fill=skin)
    d.line([p["neck"], (hx, hy + r * 0.5)], fill=skin, width=int(w * 0.05))


def dress_person(img: Image.Image, p: dict[str, tuple[float, float]], g: Garment) -> Image.Image:
    """Paint the garment onto the body: its pattern, cut by its silhouette, plus the logo."""
    w, h = img.size
    shape = Image.new("L", img.size, 0)
    garment_shape(ImageDraw.Draw(shape), p, g.kind, w, h)
    unit = g.period * w
    tex = texture(g, img.size, (p["neck"][0], p["l_shoulder"][1]), unit)
    if g.pattern == "logo":
        cx = (p["l_shoulder"][0] + p["r_shoulder"][0]) / 2
        _logo(ImageDraw.Draw(tex), cx, h * 0.42, w * 0.08, SECOND[g.second])
    img.paste(tex, (0, 0), shape)
    return shape


def product_shot(g: Garment, size: tuple[int, int]) -> Image.Image:
    """The flat garment on white, in a fixed canonical pose, enlarged to fill the frame."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    zoom = 1.6
    p = body_points(w * zoom, h * zoom, Pose(arm_left=60, arm_right=60, legs=8, shift=0.0))
    bottom = p["l_hip"][1] + (h * zoom * 0.26 if g.kind == "dress" else 0)
    dx, dy = w / 2 - p["neck"][0], h / 2 - (p["l_shoulder"][1] + bottom) / 2
    p = {k: (x + dx, y + dy) for k, (x, y) in p.items()}
    shape = Image.new("L", size, 0)
    garment_shape(ImageDraw.Draw(shape), p, g.kind, w * zoom, h * zoom)
    tex = texture(g, size, (p["neck"][0], p["l_shoulder"][1]), g.period * w * zoom)
    if g.pattern == "logo":
        cx = (p["l_shoulder"][0] + p["r_shoulder"][0]) / 2
        _logo(ImageDraw.Draw(tex), cx, p["l_shoulder"][1] + h * zoom * 0.14, w * zoom * 0.08, SECOND[g.second])
    img.paste(tex, (0, 0), shape)
    return img


def skeleton(size: tuple[int, int], p: dict[str, tuple[float, float]], background: int = 0) -> Image.Image:
    img = Image.new("RGB", size, (background,) * 3)
    d = ImageDraw.Draw(img)
    w = size[0]
    for (a, b), colour in zip(LIMBS, LIMB_COLOURS, strict=True):
        d.line([p[a], p[b]], fill=colour, width=max(1, int(w * 0.025)))
    for x, y in p.values():
        r = w * 0.02
        d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    return img


def _down(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img.resize(size, Image.BOX)  # area averaging: an edge never spreads beyond its own pixel


def second_colour(colour: str) -> str:
    """The pattern's second colour: black on the light colours, white on the dark ones."""
    return "black" if colour in ("yellow", "pink", "orange") else "white"


def random_garment(rng: random.Random, split: str) -> Garment:
    pattern, colour = rng.choice(combinations(split))
    return Garment(rng.choice(KINDS), pattern, colour, second_colour(colour), period=rng.choice([0.14, 0.18, 0.22]))


def random_pose(rng: random.Random) -> Pose:
    return Pose(rng.choice([5, 20, 40]), rng.choice([5, 20, 40]), rng.choice([3, 8, 14]), rng.uniform(-0.06, 0.06))


def make_item(
    seed: int, split: str = "train", index: int = 0, size: tuple[int, int] = (64, 64), garment: Garment | None = None
) -> TryOnItem:
    """Item `index` of a split: the same for the same (seed, split, index, size)."""
    rng = random.Random(f"{seed}-{split}-{index}")
    drawn = random_garment(rng, split)  # always drawn, so the same index gives the same person and pose
    g = garment or drawn
    pose = random_pose(rng)
    skin, bg = rng.choice(SKINS), rng.choice(BACKGROUNDS)
    big = (size[0] * SCALE, size[1] * SCALE)
    p = body_points(*big, pose)
    person = Image.new("RGB", big, bg)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-10, 11, (big[1] // 8, big[0] // 8, 3))
    person = Image.fromarray(
        np.clip(np.asarray(person, dtype=np.int16) + np.kron(noise, np.ones((8, 8, 1), dtype=np.int16)), 0, 255).astype(
            np.uint8
        )
    )
    draw_body(person, p, skin)
    dress_person(person, p, g)
    # the try-on mask: where any garment of either kind could be, dilated, so it does not leak the kind
    region = Image.new("L", big, 0)
    garment_shape(ImageDraw.Draw(region), p, "dress", *big)
    region = region.resize(size, Image.BOX).point(lambda v: 255 if v > 0 else 0)
    from PIL import ImageFilter

    mask = region.filter(ImageFilter.MaxFilter(3))
    person_small = _down(person, size)
    pose_img = _down(skeleton(big, p), size)
    keep = Image.composite(Image.new("RGB", size, 0), person_small, mask)
    keep_big = _down(skeleton(big, p), size)
    keep = Image.composite(keep_big, keep, keep_big.convert("L").point(lambda v: 255 if v > 40 else 0))
    return TryOnItem(
        person_small, _down(product_shot(g, big), size), mask, pose_img, keep, f"a person wearing {g.caption}", g
    )


def write_dataset(out: Path, n_train: int, n_test: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """`diffbase data synth`: train/ and test/ in the VITON-HD layout (image/, cloth/, agnostic-mask/,
    pose/, keep/; {split}_pairs.txt at the root) with a metadata.json per split as well."""
    from diffbase.io import write_json_atomic, write_text_atomic

    for split, n in (("train", n_train), ("test", n_test)):
        root = out / split
        for folder in ("image", "cloth", "agnostic-mask", "pose", "keep"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        pairs, entries = [], []
        for i in range(n):
            item = make_item(seed, split, i, size)
            name = f"{i:05d}"
            item.person.save(root / "image" / f"{name}.png")
            (root / "image" / f"{name}.txt").write_text(item.caption)  # image/ is also a captioned folder
            item.garment.save(root / "cloth" / f"{name}.png")
            item.mask.save(root / "agnostic-mask" / f"{name}_mask.png")
            item.pose.save(root / "pose" / f"{name}.png")
            item.keep.save(root / "keep" / f"{name}.png")
            pairs.append(f"{name}.png {name}.png")
            g = item.spec
            entries.append(
                {
                    "person": f"image/{name}.png",
                    "target": f"image/{name}.png",
                    "garment": f"cloth/{name}.png",
                    "mask": f"agnostic-mask/{name}_mask.png",
                    "pose": f"pose/{name}.png",
                    "keep": f"keep/{name}.png",
                    "caption": item.caption,
                    "garment_kind": g.kind,
                    "pattern": g.pattern,
                    "colour": g.colour,
                }
            )
        write_text_atomic(out / f"{split}_pairs.txt", "\n".join(pairs) + "\n")
        write_json_atomic(root / "metadata.json", entries)
    return out


def write_edit_pairs(out: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """Paired edits for Kontext / Fill training (size: width, height): the same person before (`source`) and after
    (`image`) their garment is recoloured, the garment area (`mask`) and the instruction as the
    caption ("make the shirt green"), in metadata.jsonl."""
    import json
    from dataclasses import replace

    from diffbase.io import write_text_atomic

    for folder in ("source", "target", "mask"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    colours = list(COLOURS)
    for i in range(n):
        before = make_item(seed, "train", i, size)
        rng = random.Random(f"{seed}-edit-{i}")
        colour = rng.choice([c for c in colours if c != before.spec.colour])
        after = make_item(seed, "train", i, size, garment=replace(before.spec, colour=colour))
        name = f"{i:05d}.png"
        before.person.save(out / "source" / name)
        after.person.save(out / "target" / name)
        after.mask.save(out / "mask" / name)
        entry = {"image": f"target/{name}", "source": f"source/{name}", "mask": f"mask/{name}"}
        lines.append(json.dumps(entry | {"caption": f"make the {before.spec.kind} {colour}"}))
    write_text_atomic(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out


def write_multi_reference(out: Path, n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> Path:
    """Two-reference items for DreamO training (size: one reference's width, height): two garments'
    product shots as `[ref#1]` and `[ref#2]`, and a target twice as wide with both side by side in an
    order the caption names ("[ref#2] on the left and [ref#1] on the right"), with each garment's mask in
    the target (the routing loss's subject masks). Unseen colour combinations make the references the
    only way to the target's colours."""
    import json

    from diffbase.io import write_text_atomic

    for folder in ("references", "target", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    w, h = size
    lines = []
    for i in range(n):
        rng = random.Random(f"{seed}-dreamo-{i}")
        garments = [random_garment(rng, "train"), random_garment(rng, "train")]
        shots = [_down(product_shot(g, (w * SCALE, h * SCALE)), (w, h)) for g in garments]
        order = [0, 1] if rng.random() < 0.5 else [1, 0]  # which reference goes left
        target = Image.new("RGB", (2 * w, h), (255, 255, 255))
        refs = []
        for k, shot in enumerate(shots):
            name = f"{i:05d}_{k + 1}.png"
            shot.save(out / "references" / name)
            x = order.index(k) * w
            target.paste(shot, (x, 0))
            silhouette = shot.convert("L").point(lambda v: 255 if v < 245 else 0)
            mask = Image.new("L", (2 * w, h), 0)
            mask.paste(silhouette, (x, 0))
            mask.save(out / "masks" / name)
            refs.append({"image": f"references/{name}", "task": "ip", "mask": f"masks/{name}"})
        target.save(out / "target" / f"{i:05d}.png")
        caption = f"[ref#{order[0] + 1}] on the left and [ref#{order[1] + 1}] on the right"
        lines.append(json.dumps({"image": f"target/{i:05d}.png", "caption": caption, "references": refs}))
    write_text_atomic(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out
