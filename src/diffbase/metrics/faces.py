"""Face identity similarity ("ID similarity" / "FaceSim" in DreamO, PuLID, InstantID): the largest face that
insightface's detector finds in a result and in its reference, and the cosine of their ArcFace embeddings.

The models come from a local insightface model pack (antelopev2, buffalo_l: a SCRFD detector ONNX and an ArcFace
recognition ONNX). insightface has no switch that forbids downloads; it downloads only when the `name` it is given
is not a folder (it then fetches that pack into `root`). diffbase checks the folder first and hands it over as that
`name`, so insightface loads the folder's ONNX files and nothing else, and never looks in ~/.insightface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError, first_line

DET_SIZE = (640, 640)  # the detector's input in the published evaluations: FaceAnalysis.prepare(det_size=(640, 640))
PACK = "an insightface model pack: a SCRFD face detector ONNX and an ArcFace recognition ONNX (antelopev2, buffalo_l)"


def check(path: str, key: str = "--face") -> Path:
    """The pack's folder, checked before anything loads: it exists and holds ONNX files."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}: {folder}: not a folder ({PACK}; diffbase downloads nothing)")
    if not any(folder.glob("*.onnx")):
        nested = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.onnx")))
        hint = f"; its ONNX files are in {nested[0]}: give that folder" if nested else ""
        raise UserError(f"{key}: {folder}: no .onnx files, expected {PACK}{hint}")
    return folder.resolve()


def load(path: str, key: str = "--face") -> Any:
    """insightface's FaceAnalysis on the pack's detector and recognizer only, prepared at DET_SIZE."""
    folder = check(path, key)
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise UserError(
            f"{key}: face similarity needs insightface and onnxruntime: pip install 'diffbase[face]'"
        ) from None
    try:  # a folder as `name` is loaded as it is; `root` only matters to a name that is not a folder
        app = FaceAnalysis(name=str(folder), root=str(folder), allowed_modules=["detection", "recognition"])
    except AssertionError:  # FaceAnalysis asserts that one of the files is a detector
        raise UserError(f"{key}: {folder}: no face detector among its ONNX files, expected {PACK}") from None
    except Exception as exc:  # onnx / onnxruntime on a file that is not a model (their errors share no base class)
        raise UserError(
            f"{key}: {folder}: insightface could not load it ({first_line(exc)}); expected {PACK}"
        ) from None
    if "recognition" not in app.models:
        raise UserError(f"{key}: {folder}: no ArcFace recognition model among its ONNX files, expected {PACK}")
    app.prepare(ctx_id=0, det_size=DET_SIZE)
    return app


def bgr(image: torch.Tensor) -> Any:
    """A [0, 1] RGB image (3, H, W) as the uint8 BGR array (H, W, 3) insightface reads (cv2's layout)."""
    pixels = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return pixels[:, :, ::-1].copy()


def area(face: Any) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    return (x2 - x1) * (y2 - y1)


def embeddings(app: Any, images: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The ArcFace embedding of the largest face in each image (box area); None where no face is found."""
    import warnings

    out: list[torch.Tensor | None] = []
    for image in images:
        with warnings.catch_warnings():  # insightface's alignment calls scikit-image's deprecated `estimate`
            warnings.filterwarnings("ignore", message=".*`estimate` is deprecated.*", category=FutureWarning)
            faces = app.get(bgr(image))
        out.append(torch.from_numpy(max(faces, key=area).embedding).double() if faces else None)
    return out


def similarity(results: list[torch.Tensor | None], references: list[torch.Tensor | None]) -> dict[str, Any]:
    """The mean cosine of the pairs where both faces were found (face_sim), how many that is (face_pairs) and how
    many pairs lack a face in the result or in its reference (face_missing, left out of the mean)."""
    from diffbase.metrics.scores import cosine

    pairs = [(a, b) for a, b in zip(results, references, strict=True) if a is not None and b is not None]
    out: dict[str, Any] = {"face_pairs": len(pairs), "face_missing": len(results) - len(pairs)}
    if pairs:
        values = cosine(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
        out["face_sim"] = float(values.mean())
    return out
