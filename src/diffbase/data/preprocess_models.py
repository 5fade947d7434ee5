"""Masks and keypoints computed by models from local folders (transformers), so a user need not make them by hand.

- Human parsing (a SegFormer such as mattmdjaga/segformer_b2_clothes, or any AutoModelForSemanticSegmentation
  with parsing labels): a class per pixel, at the image's size. From it, a garment mask for try-on (CatVTON's
  cloth types upper / lower / overall) and a subject's foreground for DreamO (everything but the background).
- Pose (ViTPose through VitPoseForPoseEstimation): one person's COCO-17 keypoints, turned into OpenPose's
  COCO-18 order (diffbase.pose draws that JSON), for DreamFit's pose mode and ControlNet pose controls.

Classes are found by their names in the model's config.id2label, never by index, so ATR-, LIP- and CIHP-style
parsers all work. What a garment mask holds follows CatVTON's automasker (model/cloth_masker.py), which
combines two SCHP parsers (ATR, LIP) with DensePose: it repaints the garment's classes (upper: Upper-clothes,
Coat, Dress, Jumpsuits; lower: Pants, Skirt, Dress, Jumpsuits; overall: all of them) plus the body regions
under them from DensePose (upper: torso and arms; lower: thighs and legs), grown by a convex hull, a blur and
a dilation, and it keeps the face, hair, hands, feet, accessories (hat, sunglasses, glove, bag, shoes, scarf,
socks) and the other garment (upper keeps pants, skirt and legs; lower keeps upper clothes, coat and arms).
With one parser and no DensePose, the body regions here are the parser's skin classes (arms, legs, torso
skin), a belt goes with every cloth type, the mask is dilated by about 1% of the image's longer side, and
the kept classes are cut out after the dilation; hands stay part of the arms (ATR has no hand class).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffbase.errors import UserError, first_line
from diffbase.models.folders import local_pretrained

CLOTH_TYPES = ("upper", "lower", "overall")
Point = tuple[float, float, float]  # x, y (pixels of the image), score
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

# Label names as `normalise` makes them (lowercase letters and digits), with the spellings of ATR, LIP and CIHP.
UPPER = ("upperclothes", "coat", "dress", "jumpsuits", "jumpsuit")
LOWER = ("pants", "skirt", "dress", "jumpsuits", "jumpsuit")
ARMS = ("leftarm", "rightarm")
LEGS = ("leftleg", "rightleg")
MASKED = {
    "upper": (*UPPER, *ARMS, "torsoskin", "belt"),
    "lower": (*LOWER, *LEGS, "belt"),
    "overall": (*UPPER, *LOWER, *ARMS, *LEGS, "torsoskin", "belt"),
}
KEPT = ("face", "hair", "hat", "sunglasses", "glove", "gloves", "bag", "leftshoe", "rightshoe", "scarf", "socks")
PROTECTED = {
    "upper": (*KEPT, "pants", "skirt", *LEGS),
    "lower": (*KEPT, "upperclothes", "coat", *ARMS),
    "overall": KEPT,
}
BACKGROUND = ("background",)

# OpenPose COCO-18 keypoint k is COCO-17 keypoint COCO17_OF_OPENPOSE18[k]; the neck (1) is the shoulders' midpoint.
COCO17_OF_OPENPOSE18 = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
LEFT_SHOULDER, RIGHT_SHOULDER = 5, 6
MIN_SCORE = 0.3  # below it a keypoint is written as undetected (0, 0, 0), as DWPose / controlnet_aux threshold

PARSER_KIND = "a local human-parsing segmentation model folder (a SegFormer such as mattmdjaga/segformer_b2_clothes)"
POSE_KIND = "a local ViTPose model folder (such as usyd-community/vitpose-base-simple)"


@dataclass(frozen=True)
class Parsing:
    """A parser's answer: the class of every pixel (H, W) at the image's size, and the names of the classes."""

    labels: np.ndarray
    id2label: dict[int, str]


@dataclass(frozen=True)
class Parser:
    """A loaded human-parsing model; calling it parses one image."""

    model: Any
    processor: Any
    id2label: dict[int, str]

    def __call__(self, image: Image.Image) -> Parsing:
        return Parsing(parse(self.model, self.processor, image), self.id2label)


@dataclass(frozen=True)
class PoseModel:
    """A loaded ViTPose model; calling it gives one person's OpenPose COCO-18 keypoints."""

    model: Any
    processor: Any

    def __call__(self, image: Image.Image, box: Box | None = None) -> list[Point]:
        return openpose18(estimate(self.model, self.processor, image, box))


def normalise(name: str) -> str:
    """`Upper-clothes`, `upper_clothes` and `UpperClothes` are one name."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def class_ids(id2label: dict[int, str], names: Sequence[str]) -> list[int]:
    """The ids whose label is one of `names` (normalised)."""
    wanted = set(names)
    return sorted(int(i) for i, label in id2label.items() if normalise(label) in wanted)


def model_folder(folder: str | Path | None, option: str, kind: str) -> Path:
    """The folder a user named, or a one-line error saying what belongs there."""
    if not folder:
        raise UserError(f"{option}: give {kind}")
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{option}: {folder} is not a folder (expected {kind})")
    return path


def load_config(path: Path, option: str, kind: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        reason = first_line(exc)
        raise UserError(f"{option}: {path}: not a transformers model folder ({reason}); expected {kind}") from None


def load_parser(folder: str | Path | None, option: str = "--parser", device: Any = "cpu") -> Parser:
    """A human-parsing model from a local folder; its labels are checked (from the config) before weights load."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    path = model_folder(folder, option, PARSER_KIND)
    names = getattr(load_config(path, option, PARSER_KIND), "id2label", None) or {}
    id2label = {int(i): str(v) for i, v in names.items()}
    if not class_ids(id2label, BACKGROUND) or not class_ids(id2label, MASKED["overall"]):
        shown = ", ".join(list(id2label.values())[:5]) or "none"
        raise UserError(f"{option}: {path}: its labels ({shown}, ...) are not a human parser's; expected names such "
                        "as Background, Upper-clothes, Pants, Left-arm (ATR or LIP labels)")  # fmt: skip
    model, processor = local_pretrained(path, option, "a semantic-segmentation model",
                                        AutoModelForSemanticSegmentation, AutoImageProcessor)  # fmt: skip
    return Parser(model.float().to(device).eval(), processor, id2label)  # float32: the processor's pixels


def parse(model: Any, processor: Any, image: Image.Image) -> np.ndarray:
    """Class ids (H, W): the logits upsampled bilinearly to the image's size, then the best class per pixel (as
    transformers' post_process_semantic_segmentation does)."""
    import torch

    with torch.no_grad():
        inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(model.device)
        logits = model(**inputs).logits.float()
        logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                 align_corners=False)  # fmt: skip
    return logits.argmax(dim=1)[0].cpu().numpy()


def human_parsing(folder: str | Path, image: Image.Image, option: str = "--parser", device: Any = "cpu") -> Parsing:
    """The label map of one image (loads the model; keep a `load_parser` result to parse several)."""
    return load_parser(folder, option, device)(image)


def dilation_radius(shape: tuple[int, ...]) -> int:
    """About 1% of the longer side (8 px at 1024): covers the old garment's edge, which parsers draw loosely."""
    return max(1, round(max(shape[:2]) / 128))


def dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """A boolean mask grown by `radius` pixels (a square window's maximum)."""
    import torch

    if radius <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0.5


def to_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


def garment_mask(labels: np.ndarray, id2label: dict[int, str], kind: str, dilate: int | None = None) -> Image.Image:
    """The area to repaint for a cloth type (white, L mode, the label map's size): the union of the garment's and
    the body parts' classes under it, dilated (`dilate` pixels; None: about 1% of the longer side), minus the
    classes kept whatever the dilation (face, hair, accessories, the other garment)."""
    if kind not in CLOTH_TYPES:
        raise ValueError(f"cloth type {kind!r}: expected one of {', '.join(CLOTH_TYPES)}")
    mask = np.isin(labels, class_ids(id2label, MASKED[kind]))
    mask = dilated(mask, dilation_radius(labels.shape) if dilate is None else dilate)
    return to_image(mask & ~np.isin(labels, class_ids(id2label, PROTECTED[kind])))


def foreground(labels: np.ndarray, id2label: dict[int, str]) -> Image.Image:
    """Everything the parser did not call background (white, L mode)."""
    return to_image(~np.isin(labels, class_ids(id2label, BACKGROUND)))


def subject_mask(folder: str | Path, image: Image.Image, option: str = "--parser", device: Any = "cpu") -> Image.Image:
    """DreamO's subject mask (ip / tryon references): the parser's foreground; a human parser finds people and
    clothes, not other objects."""
    parsing = human_parsing(folder, image, option, device)
    return foreground(parsing.labels, parsing.id2label)


def auto_garment_mask(parsing: Parsing, kind: str, what: str = "--mask auto") -> Image.Image:
    """A garment mask for a command, or a one-line error when the parser found nothing of that cloth type."""
    mask = garment_mask(parsing.labels, parsing.id2label, kind)
    if mask.getextrema()[1] == 0:
        raise UserError(f"{what}: the parser found no {kind} garment (nor the skin under it) on the person; "
                        "try another --cloth-type, or give a mask file")  # fmt: skip
    return mask


def auto_subject_mask(parsing: Parsing, what: str) -> Image.Image:
    """A subject mask for a command, or a one-line error when the parser saw only background."""
    mask = foreground(parsing.labels, parsing.id2label)
    if mask.getextrema()[1] == 0:
        raise UserError(f"{what}: the parser found only background in the image; give a mask file")
    return mask


def mask_box(mask: Image.Image) -> Box | None:
    """The smallest box around a mask's white pixels (None when it has none): the person's box for ViTPose."""
    box = mask.convert("L").point(lambda v: 255 if v >= 128 else 0).getbbox()
    return None if box is None else tuple(float(v) for v in box)


def load_pose_model(folder: str | Path | None, option: str = "--pose-model", device: Any = "cpu") -> PoseModel:
    """A ViTPose model (COCO's 17 keypoints) from a local folder, checked from its config before weights load."""
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    path = model_folder(folder, option, POSE_KIND)
    config = load_config(path, option, POSE_KIND)
    if config.model_type != "vitpose":
        raise UserError(f"{option}: {path}: a {config.model_type} model, not ViTPose; expected {POSE_KIND}")
    if config.num_labels != 17:
        raise UserError(f"{option}: {path}: {config.num_labels} keypoints; expected COCO's 17 (a ViTPose COCO model)")
    if importlib.util.find_spec("scipy") is None:
        raise UserError(f"{option}: ViTPose's image processor needs scipy; pip install scipy")
    model, processor = local_pretrained(path, option, "a ViTPose model", VitPoseForPoseEstimation, AutoImageProcessor)
    return PoseModel(model.float().to(device).eval(), processor)


def estimate(model: Any, processor: Any, image: Image.Image, box: Box | None = None) -> list[Point]:
    """One person's COCO-17 keypoints in the image's pixels; the box (default: the whole image) is where ViTPose
    looks, as a top-down model that a person detector would otherwise feed."""
    import torch

    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(image.width), float(image.height))
    boxes = [[[x0, y0, x1 - x0, y1 - y0]]]  # COCO's x, y, width, height
    with torch.no_grad():
        inputs = processor(images=image.convert("RGB"), boxes=boxes, return_tensors="pt").to(model.device)
        extra = {}
        if getattr(model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose++: expert 0 is COCO's head
            extra["dataset_index"] = torch.zeros(1, dtype=torch.long, device=model.device)
        outputs = model(**inputs, **extra)
    person = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    xy, scores = person["keypoints"].float().numpy(), person["scores"].float().reshape(-1).numpy()
    return [(float(x), float(y), float(s)) for (x, y), s in zip(xy, scores, strict=True)]


def openpose18(points17: Sequence[Point]) -> list[Point]:
    """COCO-17 keypoints (ViTPose, COCO's order) -> OpenPose's COCO-18 order, the neck added between the
    shoulders (scored as the weaker shoulder)."""
    left, right = points17[LEFT_SHOULDER], points17[RIGHT_SHOULDER]
    neck = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2, min(left[2], right[2]))
    return [neck if k is None else tuple(points17[k]) for k in COCO17_OF_OPENPOSE18]


def pose_keypoints(
    folder: str | Path, image: Image.Image, box: Box | None = None, option: str = "--pose-model", device: Any = "cpu"
) -> list[Point]:
    """One person's OpenPose COCO-18 keypoints (loads the model; keep a `load_pose_model` result for several)."""
    return load_pose_model(folder, option, device)(image, box)


def openpose_json(points: Sequence[Point], size: tuple[int, int], min_score: float = MIN_SCORE) -> dict[str, Any]:
    """OpenPose's keypoints JSON for one person (what diffbase.pose draws): points scored below `min_score`
    written as undetected (0, 0, 0)."""
    flat: list[float] = []
    for x, y, s in points:
        flat += [round(x, 2), round(y, 2), round(s, 4)] if s >= min_score else [0.0, 0.0, 0.0]
    return {"version": 1.3, "canvas_width": size[0], "canvas_height": size[1],
            "people": [{"pose_keypoints_2d": flat}]}  # fmt: skip


def skeleton(points: Sequence[Point], size: tuple[int, int], min_score: float = MIN_SCORE) -> Image.Image:
    """The keypoints drawn as diffbase.pose draws an OpenPose JSON file."""
    from diffbase.pose import draw_openpose

    return draw_openpose(openpose_json(points, size, min_score)["people"][0]["pose_keypoints_2d"], size)


def write_keypoints(path: str | Path, points: Sequence[Point], size: tuple[int, int]) -> Path:
    from diffbase.io import write_text_atomic

    return write_text_atomic(path, json.dumps(openpose_json(points, size)) + "\n")


def beside(out: str | Path, suffix: str, option: str, overwrite: bool = False) -> Path:
    """Where a computed input is saved next to a command's output (OUT's stem + suffix), so the user sees it;
    an existing file is an error unless --overwrite."""
    path = Path(out).with_name(Path(out).stem + suffix)
    if path.exists() and not overwrite:
        raise UserError(f"{option}: {path} (the computed input, saved beside --out) exists; "
                        "give another --out, or --overwrite to replace it")  # fmt: skip
    return path
