"""ControlNet control images computed from the training data, for entries that have no `control` image:
Canny edges or a depth map of the image, or an OpenPose skeleton drawn from the image's keypoints file (or,
without one and with a pose model given, from keypoints a local ViTPose model estimates on the image).

Each is computed once and kept as a PNG keyed by what went into it (the source file's content, the size,
the detector's settings), so later runs, resumes and the other processes of a run read it back. Canny and
depth are computed on the image as the dataset scales it for its bucket (1-pixel edges stay sharp and the
control matches what the model sees); a skeleton is drawn at the image's own size, where its keypoints
are, and scaled with the image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from diffbase.data.buckets import crop_geometry
from diffbase.errors import UserError
from diffbase.models.folders import local_pretrained

ConditioningType = Literal["given", "canny", "depth", "pose"]
KEYPOINTS_SUFFIX = "_keypoints.json"  # OpenPose's --write_json name: <image stem>_keypoints.json beside the image

Detector = Callable[[Path, tuple[int, int]], Image.Image]  # (source file, size) -> RGB control image


@dataclass(frozen=True)
class ControlSettings:
    """What computes the controls (training.controlnet's keys, passed down so the data layer needs no method)."""

    kind: str  # canny | depth | pose
    canny_low: int = 100
    canny_high: int = 200
    depth_model: str | None = None
    pose_model: str | None = None  # pose: a local ViTPose folder, for images without a keypoints file

    def identity(self) -> list[Any]:
        """What changes the result besides the source file and size: part of every cache key."""
        if self.kind == "canny":
            return ["canny", self.canny_low, self.canny_high]
        if self.kind == "depth":
            return ["depth", *folder_identity(Path(self.depth_model or ""))]
        if self.kind == "pose" and self.pose_model:  # skeletons drawn from files are redrawn too: cheap
            return ["pose", *folder_identity(Path(self.pose_model))]
        return [self.kind]


@dataclass(frozen=True)
class Job:
    """One control to compute: from `source` (the image, or its keypoints) at `size` (width, height) into `path`."""

    source: Path
    size: tuple[int, int]
    path: Path


def keypoints_file(image: Path) -> Path:
    return image.with_name(image.stem + KEYPOINTS_SUFFIX)


def folder_identity(folder: Path) -> list[Any]:
    """A model folder by its files' names, sizes and times: a changed model makes new controls, without
    hashing gigabytes of weights each run."""
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stamps = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return [str(folder.resolve()), *stamps]
    except OSError:
        return [str(folder)]


def check_settings(s: ControlSettings, key: str = "training.controlnet") -> None:
    """The settings' own checks, before anything loads."""
    if s.kind == "canny" and not 0 <= s.canny_low <= s.canny_high:
        raise UserError(f"{key}.canny_low: expected 0 <= canny_low <= canny_high, got {s.canny_low} and {s.canny_high}")
    if s.kind == "depth" and not s.depth_model:
        raise UserError(
            f"{key}.depth_model: required for conditioning_type 'depth': the local folder of a transformers "
            "depth-estimation model (DPT, Depth Anything)"
        )
    if s.kind == "depth" and not Path(str(s.depth_model)).is_dir():
        raise UserError(f"{key}.depth_model: {s.depth_model} is not a folder (expected a local depth-estimation model)")
    if s.kind == "pose" and s.pose_model and not Path(str(s.pose_model)).is_dir():
        raise UserError(f"{key}.pose_model: {s.pose_model} is not a folder (expected a local ViTPose model)")


def scaled_size(dataset: Any, i: int) -> tuple[int, int]:
    """The size item i's image is scaled to before its crop (the same for every crop and epoch)."""
    return crop_geometry(*dataset.size_of[i], dataset.bucket_of[i])[0]


def plan(dataset: Any, settings: ControlSettings, root: Path) -> dict[int, Job]:
    """The control of every record without one, by record index; a pose entry without keypoints is an error
    naming its image, unless a pose model estimates them (from the image). Only file digests are read here,
    nothing is computed."""
    from diffbase.io import file_digest

    identity, digests, jobs = settings.identity(), {}, {}
    for i, rec in enumerate(dataset.records):
        if rec.control is not None:
            continue
        if settings.kind == "pose":
            source, size = keypoints_file(rec.image), dataset.size_of[i]
            if not source.is_file() and settings.pose_model:
                source = rec.image  # drawn from what the pose model finds, at the image's own size
            elif not source.is_file():
                raise UserError(
                    f"{rec.image}: no keypoints file {source.name} beside it (training.controlnet.conditioning_type "
                    "'pose' draws the control from OpenPose keypoints JSON); add it, give the entry a 'control', "
                    "or set training.controlnet.pose_model to a local ViTPose folder to estimate them"
                )
        else:
            source, size = rec.image, scaled_size(dataset, i)
        if source not in digests:  # an image repeated (repeats, weights) is read once
            digests[source] = file_digest(source)
        key = hashlib.sha256(json.dumps([identity, digests[source], list(size)]).encode()).hexdigest()[:32]
        jobs[i] = Job(source, size, root / settings.kind / f"{key}.png")
    return jobs


def compute(jobs: dict[int, Job], settings: ControlSettings, device: Any = "cpu") -> tuple[int, set[Path]]:
    """Compute and store the controls not stored yet (each once, atomically), with a progress bar. Returns
    how many were computed, and the controls whose image could not be decoded. The detector (the depth
    model) loads only when there is work."""
    from tqdm import tqdm

    from diffbase.data.images import BadFile
    from diffbase.io import save_png_atomic
    from diffbase.progress import shown

    todo = list({job.path: job for job in jobs.values() if not job.path.is_file()}.values())
    if not todo:
        return 0, set()
    detect, failed = detector(settings, device), set()
    for job in tqdm(todo, desc=f"controls ({settings.kind})", unit="img", disable=not shown()):
        try:
            save_png_atomic(detect(job.source, job.size), job.path)
        except BadFile:
            failed.add(job.path)
    del detect
    free_accelerator(device)
    return len(todo) - len(failed), failed


def apply(dataset: Any, jobs: dict[int, Job], failed: Collection[Path] = ()) -> None:
    """Point each record without a control at its computed one (validation then finds them there too). One
    whose image could not be decoded points at that image, so the dataset skips it or stops on it as
    data.on_bad_file says, naming the image."""
    dataset.records = [
        rec if i not in jobs else replace(rec, slots={**rec.slots, "control": control_path(rec, jobs[i], failed)})
        for i, rec in enumerate(dataset.records)
    ]


def control_path(rec: Any, job: Job, failed: Collection[Path]) -> Path:
    return rec.image if job.path in failed else job.path


def detector(settings: ControlSettings, device: Any = "cpu") -> Detector:
    if settings.kind == "canny":
        return lambda source, size: canny(scaled(source, size), settings.canny_low, settings.canny_high)
    if settings.kind == "depth":
        estimate = depth_estimator(str(settings.depth_model), device)
        return lambda source, size: estimate(scaled(source, size))
    if settings.kind == "pose":
        return pose_detector(settings, device)
    raise ValueError(f"no detector for conditioning_type {settings.kind!r}")  # 'given' computes nothing


def scaled(source: Path, size: tuple[int, int]) -> Image.Image:
    """The image as the dataset scales it (RGB, bicubic; as buckets.resize_and_crop)."""
    from diffbase.data.images import load_image

    img = load_image(source)
    return img.resize(size, Image.BICUBIC) if img.size != size else img


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges as diffusers' ControlNet examples make them: cv2.Canny on the RGB array, white edges on
    black, 3 channels."""
    try:
        import cv2
    except ImportError:
        raise UserError(
            "training.controlnet.conditioning_type: canny needs OpenCV (a diffbase dependency); "
            "pip install opencv-python-headless"
        ) from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def depth_estimator(folder: str, device: Any = "cpu") -> Callable[[Image.Image], Image.Image]:
    """A transformers depth-estimation model (DPT, Depth Anything, ...) from a local folder, as a function
    image -> depth image."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor, model = local_pretrained(folder, "training.controlnet.depth_model", "a depth-estimation model",
                                        AutoImageProcessor, AutoModelForDepthEstimation)  # fmt: skip
    model = model.to(device).eval()
    return lambda image: depth_map(model, processor, image)


def depth_map(model: Any, processor: Any, image: Image.Image) -> Image.Image:
    """The depth at the image's size, scaled to 0..255 per image as transformers' depth-estimation pipeline
    does, 3 channels (the form diffusers' depth ControlNets take)."""
    import torch

    with torch.no_grad():
        inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(model.device)
        outputs = model(**inputs)
        depth = processor.post_process_depth_estimation(outputs, [(image.height, image.width)])[0]["predicted_depth"]
    depth = depth.float().cpu().numpy()
    span = float(depth.max() - depth.min())
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    arr = (scaled * 255).round().astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1))


def pose_detector(settings: ControlSettings, device: Any = "cpu") -> Detector:
    """Keypoints files drawn; images (entries without one) through the pose model, loaded at the first image."""
    loaded: dict[str, Any] = {}

    def detect(source: Path, size: tuple[int, int]) -> Image.Image:
        if source.suffix == ".json":
            return pose(source, size)
        from diffbase.data.preprocess_models import load_pose_model, skeleton

        if "model" not in loaded:
            loaded["model"] = load_pose_model(settings.pose_model, "training.controlnet.pose_model", device)
        image = scaled(source, size)
        return skeleton(loaded["model"](image), image.size)

    return detect


def pose(keypoints: Path, size: tuple[int, int]) -> Image.Image:
    """An OpenPose keypoints JSON drawn as a COCO-18 skeleton at the image's size (black when nobody is in it)."""
    from diffbase.pose import render_openpose

    try:
        if json.loads(keypoints.read_text()).get("people") == []:
            return Image.new("RGB", size, (0, 0, 0))
        return render_openpose(keypoints, size)
    except (UserError, OSError, ValueError, AttributeError):
        raise UserError(f"{keypoints}: expected OpenPose JSON with people[0].pose_keypoints_2d") from None


def free_accelerator(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
