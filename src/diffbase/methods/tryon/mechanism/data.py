"""Try-on data: the VITON-HD layout, the DressCode layout and a plain metadata.json.

- VITON-HD: `ROOT/{split}/image/`, `cloth/`, `agnostic-mask/<stem>_mask.png` (CatVTON's masks) and
  `ROOT/{split}_pairs.txt` ("person.jpg garment.jpg" per line; VITON-HD's test pairs are unpaired).
- DressCode: `ROOT/{upper_body,lower_body,dresses}/images/<id>_0.jpg` (person) and `<id>_1.jpg`
  (garment), masks in `agnostic_masks/<id>_0.png`, pairs in `ROOT/<category>/{split}_pairs*.txt`.
- metadata.json / .jsonl: entries with `person`, `garment`, and `mask` or `box` ([x0, y0, x1, y1]
  in pixels), optional `target` (ground truth) and `caption`.

A pair is "paired" when the person wears the given garment: the person is then its own ground
truth. Unpaired pairs have none (only distribution metrics apply).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from diffbase.data.buckets import BucketBatchSampler
from diffbase.data.datasets import BadFileReport, Record, collate_items, read_json_entries, to_tensor
from diffbase.data.images import BadFile, load_image, load_mask
from diffbase.errors import UserError
from diffbase.methods.tryon.mechanism import preprocess as P

DRESSCODE_CATEGORIES = ("upper_body", "lower_body", "dresses")


def tryon_record(
    person: Path,
    garment: Path,
    mask: Path | None = None,
    box: tuple[int, int, int, int] | None = None,
    target: Path | None = None,
    caption: str = "",
    pose: Path | None = None,
) -> Record:
    """A try-on pair as a record: the person is the `image` slot (what the model produces), with
    `garment`, `mask` (or a box), `target` (the ground truth; the person itself for paired data) and
    `pose` (a pose render, DreamFit's pose mode)."""
    slots = {"image": person, "garment": garment, "mask": mask, "target": target, "pose": pose}
    return Record({k: v for k, v in slots.items() if v is not None}, caption, box=box)


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".jpg", ".jpeg", ".webp"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _pairs(file: Path) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(file.read_text().splitlines()):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise UserError(f"{file}: line {n + 1}: expected 'person garment', got '{line.strip()}'")
        out.append((parts[0], parts[1]))
    return out


def read_vitonhd(root: Path, split: str, paired: bool) -> list[Record]:
    pairs_file = root / f"{split}_pairs.txt"
    if not pairs_file.is_file():
        raise UserError(f"{root}: no {split}_pairs.txt (VITON-HD layout)")
    base = root / split
    records = []
    for person, garment in _pairs(pairs_file):
        if paired:
            garment = person
        p_stem, g_stem = Path(person).stem, Path(garment).stem
        mask = _find(base / "agnostic-mask", f"{p_stem}_mask")
        records.append(
            tryon_record(
                base / "image" / person,
                base / "cloth" / garment,
                mask,
                target=base / "image" / person if p_stem == g_stem else None,
            )
        )
    return records


def read_dresscode(root: Path, split: str, paired: bool) -> list[Record]:
    records = []
    for category in DRESSCODE_CATEGORIES:
        folder = root / category
        if not folder.is_dir():
            continue
        names = [f"{split}_pairs_{'paired' if paired else 'unpaired'}.txt", f"{split}_pairs.txt"]
        pairs_file = next((folder / n for n in names if (folder / n).is_file()), None)
        if pairs_file is None:
            raise UserError(f"{folder}: no {' or '.join(names)} (DressCode layout)")
        for person, garment in _pairs(pairs_file):
            p_id = Path(person).stem.rsplit("_", 1)[0]
            if paired:
                garment = f"{p_id}_1{Path(garment).suffix}"
            g_id = Path(garment).stem.rsplit("_", 1)[0]
            records.append(
                tryon_record(
                    folder / "images" / person,
                    folder / "images" / garment,
                    _find(folder / "agnostic_masks", Path(person).stem),
                    target=folder / "images" / person if p_id == g_id else None,
                    caption=category.replace("_", " "),
                )
            )
    return records


def read_metadata(file: Path) -> list[Record]:
    entries = read_json_entries(file)
    if not isinstance(entries, list):
        raise UserError(f"{file}: expected a list of objects with 'person' and 'garment'")
    records = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "person" not in e or "garment" not in e:
            raise UserError(f"{file}: entry {n}: expected an object with 'person' and 'garment'")
        if "mask" not in e and "box" not in e:
            raise UserError(f"{file}: entry {n}: needs a 'mask' image or a 'box' [x0, y0, x1, y1]")
        box = e.get("box")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise UserError(f"{file}: entry {n}: 'box' must be [x0, y0, x1, y1] in pixels")
        rel = {k: file.parent / e[k] if e.get(k) else None for k in ("person", "garment", "mask", "target", "pose")}
        records.append(
            tryon_record(
                rel["person"],
                rel["garment"],
                rel["mask"],
                tuple(box) if box else None,
                rel["target"],
                str(e.get("caption", "")),
                rel["pose"],
            )
        )
    return records


def read_tryon(path: str | Path, split: str = "train", paired: bool = True) -> list[Record]:
    """Records from any supported layout (detected from what the folder holds)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data.train_path: {path} not found")
    if path.is_file():
        return read_metadata(path)
    for name in ("metadata.jsonl", "metadata.json"):
        if (path / split / name).is_file():
            records = read_metadata(path / split / name)
            break
        if (path / name).is_file():
            records = read_metadata(path / name)
            break
    else:
        if (path / f"{split}_pairs.txt").is_file():
            records = read_vitonhd(path, split, paired)
        elif any((path / c).is_dir() for c in DRESSCODE_CATEGORIES):
            records = read_dresscode(path, split, paired)
        else:
            raise UserError(
                f"{path}: not a try-on dataset (expected metadata.json, {split}_pairs.txt with image/ and cloth/, "
                "or DressCode's upper_body/lower_body/dresses)"
            )
    if not records:
        raise UserError(f"{path}: no try-on pairs found for split '{split}'")
    return records


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


class TryOnDataset:
    """Records -> person, garment, mask (and target) tensors at one size (height, width)."""

    def __init__(self, records: list[Record], size: tuple[int, int], seed: int = 0, on_bad_file: str = "skip") -> None:
        self.records, self.size, self.seed, self.epoch = records, tuple(size), seed, 0
        self.on_bad_file = on_bad_file
        self.report = BadFileReport()
        self.load_pixels = True  # False once a method's cache holds every latent the step needs
        self.unusable: set[int] = set()  # items whose files failed to load

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sampler(self, batch_size: int, shuffle: bool = True) -> BucketBatchSampler:
        return BucketBatchSampler({self.size: list(range(len(self)))}, batch_size, self.seed, shuffle)

    def _image(self, path: Path) -> torch.Tensor:
        """A person-side image (person, ground truth, pose): centre-cropped to the aspect, then resized."""
        h, w = self.size
        return to_tensor(P.crop_to_aspect(load_image(path), (w, h)))

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        h, w = self.size
        if not self.load_pixels:
            return None if i in self.unusable else {"index": i, "caption": rec.caption, "size": self.size}
        try:
            person = load_image(rec.image)
            if rec.mask is not None:
                mask = load_mask(rec.mask)
            elif rec.box is not None:
                mask = box_mask(person.size, rec.box)
            else:
                raise BadFile(rec.image, "no mask and no box for this person")
            item = {
                "index": i,
                "person": to_tensor(P.crop_to_aspect(person, (w, h))),
                "garment": to_tensor(P.fit_and_pad(load_image(rec.garment), (w, h))),
                "person_mask": (to_tensor(P.crop_to_aspect(mask.convert("L"), (w, h))) > 0.5).float(),
                "caption": rec.caption,
                "size": self.size,
            }
            if rec.target is not None:
                item["target"] = self._image(rec.target)
            if rec.pose is not None:
                item["pose"] = self._image(rec.pose)
        except BadFile as err:
            self.report.skip_or_fail(err, self.on_bad_file)
            self.unusable.add(i)
            return None
        return item

    @staticmethod
    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
        return collate_items(items, ("person", "garment", "person_mask", "target", "pose"))


def split_pairs(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A held-out share of the pairs, whole garments at a time (no garment in both parts)."""
    if fraction <= 0:
        return records, []
    garments = sorted({r.garment for r in records})
    held = set(random.Random(seed).sample(garments, max(1, round(len(garments) * fraction))))
    return [r for r in records if r.garment not in held], [r for r in records if r.garment in held]
