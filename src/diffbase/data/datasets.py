"""Training datasets: folders of images with `.txt` captions, or metadata.json / metadata.jsonl.

Files are checked once up front (header only), so bad ones are dropped before batching and the
buckets use true sizes; a file that still fails when decoded is skipped in its batch. Either way
the run does not crash mid-epoch, and the skipped files are reported.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from diffbase.config import DataConfig, DatasetConfig
from diffbase.data.buckets import (
    BucketBatchSampler,
    assign_bucket,
    crop_geometry,
    make_buckets,
    resize_and_crop,
    resolutions,
    same_crop,
)
from diffbase.data.captions import shuffled, with_trigger
from diffbase.data.images import IMAGE_SUFFIXES, BadFile, image_size, load_image, load_mask
from diffbase.errors import UserError, closest

# Named image slots a record may hold. `image` is what the model learns to produce (the target; the
# person for try-on); the others are companions: `mask` (loss or inpainting area), `control`
# (ControlNet), `reference`, `reference_2`, ... (references of editing and customization methods),
# `source` (the input of a paired edit), `garment`, `pose` and `target` (try-on; `target` is the
# ground truth of an unpaired pair).
SLOTS = ("image", "mask", "control", "reference", "source", "garment", "pose", "target")
METADATA_KEYS = {"image", "caption", "mask", "control", "reference", "references", "source"}


def is_slot(name: str) -> bool:
    return name in SLOTS or (name.startswith("reference_") and name.removeprefix("reference_").isdigit())


@dataclass
class Record:
    """One item: named image slots (see SLOTS) and a caption. `record.mask` etc. read a slot (None when
    the record has none)."""

    slots: dict[str, Path]
    caption: str = ""
    dataset: int = 0
    weight: float = 1.0  # loss weight (DreamBooth class images use the prior loss weight)
    box: tuple[int, int, int, int] | None = None  # a try-on garment area given as a box instead of a mask

    def __getattr__(self, name: str) -> Path | None:
        if is_slot(name):
            return self.__dict__.get("slots", {}).get(name)
        raise AttributeError(name)

    def companions(self) -> dict[str, Path]:
        """Every slot but the image, in a fixed order."""
        return {k: v for k, v in sorted(self.slots.items()) if k != "image"}


class Dataset(Protocol):
    """What the training loop, the cache and validation need of a dataset: plain images with captions
    (TrainDataset), paired edits (source and image slots) and try-on pairs (tryon.data.TryOnDataset)."""

    records: list[Record]
    report: BadFileReport

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Any] | None: ...
    def sampler(self, batch_size: int, shuffle: bool = True) -> BucketBatchSampler: ...
    def set_epoch(self, epoch: int) -> None: ...
    @staticmethod
    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]: ...


@dataclass
class BadFileReport:
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def add(self, error: BadFile) -> None:
        entry = (str(error.path), error.reason)
        if entry not in self.files:  # a file failing in every epoch is one bad file
            self.files.append(entry)

    def summary(self) -> str:
        if not self.files:
            return "no bad files"
        listed = "\n".join(f"  {p}: {r}" for p, r in self.files)
        return f"skipped {len(self.files)} bad file(s):\n{listed}"

    def skip_or_fail(self, error: BadFile, on_bad_file: str) -> None:
        """Report the file (data.on_bad_file: skip) or stop the run with one line (fail)."""
        if on_bad_file == "fail":
            raise UserError(f"{error.path}: {error.reason} (data.on_bad_file is 'fail')") from None
        self.add(error)


def read_folder(folder: Path, dataset: int = 0) -> list[Record]:
    """Images in a folder, each with the caption in the same-name .txt file (empty when there is none)."""
    records = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else ""
            records.append(Record({"image": path}, caption, dataset=dataset))
    return records


def read_json_entries(file: Path) -> Any:
    """metadata.json (a list) or metadata.jsonl (one object a line); errors name the file's line."""
    text = file.read_text()
    if file.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}: not valid JSON ({exc.msg} at line {n})") from None
    return entries


def read_metadata(file: Path, dataset: int = 0) -> list[Record]:
    """metadata.json (a list) or metadata.jsonl (one object a line); paths relative to the file."""
    entries = read_json_entries(file)
    if not isinstance(entries, list):
        raise UserError(f"{file}: expected a list of objects with 'image' and 'caption'")
    records = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise UserError(f"{file}: entry {n}: expected an object with an 'image' key")
        for key in entry:
            if key not in METADATA_KEYS:
                raise UserError(f"{file}: entry {n}: unknown key '{key}'{closest(key, METADATA_KEYS)}")
        records.append(Record(entry_slots(file, n, entry), str(entry.get("caption", "")), dataset))
    return records


def entry_slots(file: Path, n: int, entry: dict[str, Any]) -> dict[str, Path]:
    """A metadata entry's image slots, paths relative to the file; `references` (a list) fills
    `reference`, `reference_2`, ... after a single `reference`."""
    slots = {k: file.parent / entry[k] for k in ("image", "mask", "control", "reference", "source") if entry.get(k)}
    refs = entry.get("references") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise UserError(f"{file}: entry {n}: 'references' must be a list of image paths")
    for r in refs:
        slots["reference" if "reference" not in slots else f"reference_{len(reference_slots(slots)) + 1}"] = (
            file.parent / r
        )
    return slots


def reference_slots(slots: dict[str, Any]) -> list[str]:
    return [k for k in slots if k == "reference" or k.startswith("reference_")]


def read_dataset(path: Path, dataset: int = 0) -> list[Record]:
    if path.is_file():
        return read_metadata(path, dataset)
    for name in ("metadata.jsonl", "metadata.json"):
        if (path / name).is_file():
            return read_metadata(path / name, dataset)
    return read_folder(path, dataset)


def dataset_configs(cfg: DataConfig) -> list[DatasetConfig]:
    configs = list(cfg.datasets)
    if cfg.train_path:
        configs.insert(0, DatasetConfig(path=cfg.train_path))
    if not configs:
        raise UserError("data.train_path: required (or data.datasets), the folder or metadata file to train on")
    return configs


def build_records(cfg: DataConfig, seed: int = 0) -> list[Record]:
    """All datasets mixed. Dataset i contributes len_i x repeats_i x weight_i items: whole copies
    for the integer part, and a seeded random subset for the fraction. Fixed for the whole run."""
    rng = random.Random(seed)
    records: list[Record] = []
    for i, ds in enumerate(dataset_configs(cfg)):
        path = Path(ds.path)
        key = "data.train_path" if cfg.train_path and i == 0 else f"data.datasets[{i - int(bool(cfg.train_path))}].path"
        if not path.exists():
            raise UserError(f"{key}: {path} not found")
        if ds.repeats < 1 or ds.weight <= 0:
            raise UserError(f"{key}: repeats must be >= 1 and weight > 0")
        own = read_dataset(path, i)
        if not own:
            raise UserError(f"{key}: no images found in {path}")
        share = ds.repeats * ds.weight
        whole, fraction = int(share), share - int(share)
        records += own * whole + rng.sample(own, round(len(own) * fraction))
    if cfg.shuffle_captions and cfg.cache_text:
        raise UserError("data.shuffle_captions: each draw has its own tag order, so the text cannot be cached; "
                        "set data.cache_text=false")  # fmt: skip
    if cfg.trigger:
        records = [replace(r, caption=with_trigger(r.caption, cfg.trigger)) for r in records]
    return records


def split_records(records: list[Record], fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held out): a seeded `fraction` of the distinct images, with all their copies, is held out."""
    if fraction <= 0:
        return records, []
    if fraction >= 1:
        raise UserError("training.validation.loss_split: expected a fraction below 1")
    images = sorted({r.image for r in records})
    held = set(random.Random(seed).sample(images, max(1, round(len(images) * fraction))))
    if len(held) == len(images):
        raise UserError(f"training.validation.loss_split: {fraction} leaves no training images of {len(images)}")
    return [r for r in records if r.image not in held], [r for r in records if r.image in held]


def to_pil(t: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image (the inverse of `to_tensor`)."""
    arr = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) in [-1, 1]; L -> (1, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        return torch.from_numpy(arr / 255.0)[None]
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)


def collate_items(
    items: list[dict[str, Any] | None], tensors: tuple[str, ...], scalars: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A batch from items of one size. Items that failed to load (None) are left out; a tensor key is
    stacked when every item has it; scalar keys become a 1-d tensor."""
    kept = [it for it in items if it is not None]
    if not kept:
        return {"index": [], "caption": []}
    batch: dict[str, Any] = {
        "index": [it["index"] for it in kept],
        "caption": [it["caption"] for it in kept],
        "size": kept[0]["size"],
    }
    for key in scalars:
        batch[key] = torch.tensor([it[key] for it in kept])
    for key in tensors:
        if all(key in it for it in kept):
            batch[key] = torch.stack([it[key] for it in kept])
    return batch


class TrainDataset:
    """Records -> bucketed, cropped tensors. Item i is the same every time for a given seed and epoch. With
    several sizes in data.resolution each record is an item once per size, in that size's buckets, so an
    epoch sees every image at every size and a batch (one bucket) holds one size."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int = 0) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        self.report = BadFileReport()
        self.bucket_sets = {
            r: make_buckets(r, cfg.bucket_step, cfg.min_bucket_side, cfg.max_bucket_side) for r in resolutions(cfg)
        }  # each resolution's own buckets
        self.records: list[Record] = []
        self.bucket_of: list[tuple[int, int]] = []
        self.size_of: list[tuple[int, int]] = []  # (width, height) as stored
        self.resolution_of: list[int] = []
        self.load_pixels = True  # False when latents come from the cache
        usable = self._usable(records)
        for resolution, buckets in self.bucket_sets.items():  # every record once per resolution, in its buckets
            for rec, (w, h) in usable:
                self.records.append(rec)
                self.size_of.append((w, h))
                self.bucket_of.append(assign_bucket(h, w, buckets))
                self.resolution_of.append(resolution)
        if not self.records:
            raise UserError(f"data: every image was unusable; {self.report.summary()}")
        self.own_buckets: dict[str, list[tuple[int, int] | None]] = {}  # slot -> its own bucket per item

    def _usable(self, records: list[Record]) -> list[tuple[Record, tuple[int, int]]]:
        """The records whose files can be read, with the image's (width, height); each entry's set of files
        (image and companions) is checked once, however often it repeats."""
        sizes: dict[tuple[Path | None, ...], tuple[int, int] | None] = {}
        usable = []
        for rec in records:
            files = tuple(sorted(rec.slots.items()))
            if files not in sizes:
                sizes[files] = self._checked_size(rec)
            if sizes[files] is not None:
                usable.append((rec, sizes[files]))
        return usable

    def bucket_slots_separately(self, slots: tuple[str, ...]) -> None:
        """Give these companion slots (an edit's source and references) buckets of their own where their size
        differs from the image's: a source of another shape keeps its shape (centre-cut to its own bucket),
        and batches hold items whose slots share buckets. A slot of the image's own size keeps the image's
        cut (random crops and flips stay aligned). Call before sampling or caching."""
        for slot in slots:
            buckets: list[tuple[int, int] | None] = []
            for i, rec in enumerate(self.records):
                path = rec.slots.get(slot)
                size = image_size(path) if path is not None else None  # checked when the records were read
                same = size is None or size == self.size_of[i]
                own = self.bucket_sets[self.resolution_of[i]]  # the item's resolution's buckets
                buckets.append(None if same else assign_bucket(size[1], size[0], own))
            self.own_buckets[slot] = buckets

    def bucket_for(self, i: int, slot: str) -> tuple[int, int]:
        """The bucket slot `slot` of item i is cut to: its own one, or the image's."""
        own = self.own_buckets.get(slot)
        return own[i] if own is not None and own[i] is not None else self.bucket_of[i]

    def _checked_size(self, rec: Record) -> tuple[int, int] | None:
        try:
            for extra in rec.companions().values():
                image_size(extra)
            return image_size(rec.image)
        except BadFile as err:
            self.report.skip_or_fail(err, self.cfg.on_bad_file)
            return None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sampler(self, batch_size: int, shuffle: bool = True) -> BucketBatchSampler:
        groups: dict[Any, list[int]] = {}
        for i, bucket in enumerate(self.bucket_of):
            # the resolution too: a batch holds one resolution's items even where two share a bucket
            key = (bucket, *(self.bucket_for(i, slot) for slot in sorted(self.own_buckets)), self.resolution_of[i])
            groups.setdefault(key, []).append(i)
        return BucketBatchSampler(groups, batch_size, self.seed, shuffle)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.item(i, self.load_pixels)

    def item(self, i: int, pixels: bool = True) -> dict[str, Any] | None:
        """Item i: its cut of the image (unless `pixels` is False) as `pixels`, caption, loss weight and
        every companion slot cut the same way, under the slot's name. None when a file fails to load."""
        rec, bucket = self.records[i], self.bucket_of[i]
        rng = random.Random(hash((self.seed, self.epoch, i)))
        item: dict[str, Any] = {
            "index": i,
            "caption": rec.caption,
            "weight": rec.weight,
            "dataset": rec.dataset,
            "size": bucket,
        }
        try:
            size, box = crop_geometry(*self.size_of[i], bucket, self.cfg.crop, rng)
            flip = self.cfg.random_flip and rng.random() < 0.5
            if self.cfg.shuffle_captions:
                item["caption"] = shuffled(item["caption"], self.cfg.keep_tags, rng)
            if self.cfg.caption_dropout > 0 and rng.random() < self.cfg.caption_dropout:
                item["caption"] = ""
            images = {"pixels": same_crop(load_image(rec.image), size, box)} if pixels else {}
            for key, path in rec.companions().items():
                loader = load_mask if key == "mask" else load_image
                own = self.own_buckets.get(key)
                if own is not None and own[i] is not None:  # its own bucket, centre-cut
                    images[key] = resize_and_crop(loader(path), own[i])[0]
                else:
                    images[key] = same_crop(loader(path), size, box, nearest=key == "mask")
        except BadFile as err:
            self.report.skip_or_fail(err, self.cfg.on_bad_file)
            return None
        for key, img in images.items():
            item[key] = to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img)
        return item

    @staticmethod
    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
        slots = sorted({k for it in items if it is not None for k in it if is_slot(k)})
        return collate_items(items, ("pixels", *slots), scalars=("weight", "dataset"))
