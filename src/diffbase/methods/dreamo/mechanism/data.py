"""DreamO training data: a target image, its caption with placeholders, and several references, each
with a task and an optional subject mask (where that reference's subject is in the target: the routing
loss's target).

metadata.json(l), paths relative to the file:

    {"image": "target.png", "caption": "[ref#1] on the left, [ref#2] on the right",
     "references": [{"image": "a.png", "task": "ip", "mask": "a_in_target.png"},
                    {"image": "b.png", "task": "tryon"}]}

Targets are resized to `size`; references by area to the reference resolution (the inference
preprocessing); items are batched only with items whose references have the same count and sizes.
With progressive stages, batch b of an epoch comes from the stage its step falls in, and from a dataset
drawn by that stage's mix.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffbase.data.datasets import BadFileReport, read_json_entries, to_tensor
from diffbase.data.images import BadFile, image_size, load_image, load_mask
from diffbase.errors import UserError
from diffbase.methods.dreamo.mechanism.conditions import MAX_REFERENCES, PLACEHOLDERS, TASKS
from diffbase.methods.dreamo.mechanism.preprocess import area_size, resize_by_area

PLACEHOLDER = re.compile(r"\s*\[ref#[1-9]\]")


def strip_placeholders(caption: str) -> str:
    """The plain-text variant of a caption (the paper trains on it half of the time)."""
    return PLACEHOLDER.sub("", caption).strip()


@dataclass
class RefRecord:
    image: Path
    task: str
    mask: Path | None = None


@dataclass
class Item:
    target: Path
    caption: str
    references: list[RefRecord]
    dataset: int = 0

    @property
    def slots(self) -> dict[str, Path]:
        """The images the step encodes (what a cache entry of the item is keyed by): the target, then the
        references in their order."""
        return {"image": self.target} | {f"reference_{k + 1}": r.image for k, r in enumerate(self.references)}

    box = None  # items are not cut to a box (the cache's key has a place for one)


def read_items(file: Path, dataset: int = 0) -> list[Item]:
    if not file.exists():
        raise UserError(f"{file}: no such file or folder (DreamO data is a metadata.jsonl or a folder with one)")
    if file.is_dir():
        for name in ("metadata.jsonl", "metadata.json"):
            if (file / name).is_file():
                return read_items(file / name, dataset)
        raise UserError(f"{file}: no metadata.jsonl or metadata.json (DreamO data lists references per target)")
    entries = read_json_entries(file)
    items = []
    for n, e in enumerate(entries if isinstance(entries, list) else [None]):
        where = f"{file}: entry {n}"
        if not isinstance(e, dict) or "image" not in e or not isinstance(e.get("references"), list):
            raise UserError(f"{where}: expected an object with 'image', 'caption' and a 'references' list")
        refs = []
        for r in e["references"]:
            if not isinstance(r, dict) or "image" not in r or r.get("task", "ip") not in TASKS:
                raise UserError(f"{where}: each reference needs 'image' and a 'task' in {list(TASKS)}: {json.dumps(r)}")
            refs.append(RefRecord(file.parent / r["image"], r.get("task", "ip"),
                                  file.parent / r["mask"] if r.get("mask") else None))  # fmt: skip
        if not 1 <= len(refs) <= MAX_REFERENCES:
            raise UserError(f"{where}: {len(refs)} references; DreamO takes 1 to {MAX_REFERENCES}")
        items.append(Item(file.parent / e["image"], str(e.get("caption", "")), refs, dataset))
    return items


def placeholder_marks(tokenizer: Any, caption: str, length: int) -> list[tuple[int, int]]:
    """(T5 token position, 0-based reference) of each `[ref#k]` in the caption, as the prompt is tokenized."""
    ids = tokenizer(caption, padding="max_length", max_length=length, truncation=True).input_ids
    lookup = {tokenizer.convert_tokens_to_ids(p): k for k, p in enumerate(PLACEHOLDERS[:MAX_REFERENCES])}
    return [(pos, lookup[t]) for pos, t in enumerate(ids) if t in lookup]


class DreamODataset:
    def __init__(self, items: list[Item], size: tuple[int, int], resolution: int, seed: int = 0,
                 on_bad_file: str = "skip", stages: list[Any] | None = None) -> None:  # fmt: skip
        self.size, self.resolution, self.seed, self.epoch = tuple(size), resolution, seed, 0
        self.on_bad_file, self.stages = on_bad_file, list(stages or [])
        self.report = BadFileReport()
        self.load_pixels = True  # False once the cache holds the target's and references' latents
        self.unusable: set[int] = set()  # items whose files failed to load
        self.accumulation = 1  # batches per optimizer step: a stage of N steps takes N * accumulation batches
        self.records: list[Item] = []
        self.signature: list[tuple[Any, ...]] = []
        for item in items:
            try:
                sizes = tuple(area_size(image_size(r.image), resolution**2) for r in item.references)
                image_size(item.target)
                for r in item.references:
                    if r.mask is not None:
                        image_size(r.mask)
            except BadFile as err:
                self.report.skip_or_fail(err, on_bad_file)
                continue
            self.records.append(item)
            self.signature.append(sizes)
        if not self.records:
            raise UserError(f"data: every DreamO item was unusable; {self.report.summary()}")

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sampler(self, batch_size: int, shuffle: bool = True) -> Any:
        from diffbase.data.buckets import BucketBatchSampler

        groups: dict[Any, list[int]] = {}
        for i, sig in enumerate(self.signature):
            groups.setdefault((self.records[i].dataset, sig), []).append(i)
        if not self.stages or not shuffle:
            merged: dict[Any, list[int]] = {}
            for (_, sig), idx in groups.items():
                merged.setdefault(sig, []).extend(idx)
            return BucketBatchSampler(merged, batch_size, self.seed, shuffle)
        return StagedSampler(groups, batch_size, self.stages, self.seed, self.accumulation)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        """The item at the target size: its subject masks (NaN where a reference has none) and, unless the
        cache holds their latents (`load_pixels` off), the target's and the references' pixels."""
        item = self.records[i]
        h, w = self.size
        if not self.load_pixels and i in self.unusable:  # its latents could not be cached
            return None
        try:
            masks = [load_mask(r.mask).resize((w, h), Image.NEAREST) if r.mask else None for r in item.references]
            out = {
                "index": i,
                "caption": item.caption,
                "dataset": item.dataset,
                "route_masks": [to_tensor(m) if m is not None else torch.full((1, h, w), float("nan")) for m in masks],
                "tasks": [r.task for r in item.references],
            }
            if self.load_pixels:
                out["pixels"] = to_tensor(load_image(item.target).resize((w, h), Image.BICUBIC))
                out["references"] = [to_tensor(resize_by_area(load_image(r.image), self.resolution**2))
                                     for r in item.references]  # fmt: skip
        except BadFile as err:
            self.report.skip_or_fail(err, self.on_bad_file)
            self.unusable.add(i)
            return None
        return out

    @staticmethod
    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return {"index": []}
        count = len(items[0]["route_masks"])
        batch = {
            "index": [it["index"] for it in items],
            "caption": [it["caption"] for it in items],
            "dataset": torch.tensor([it["dataset"] for it in items]),
            "route_masks": [torch.stack([it["route_masks"][k] for it in items]) for k in range(count)],
            "tasks": [it["tasks"] for it in items],
        }
        if "pixels" in items[0]:
            batch["pixels"] = torch.stack([it["pixels"] for it in items])
            batch["references"] = [torch.stack([it["references"][k] for it in items]) for k in range(count)]
        return batch


class StagedSampler:
    """An epoch is the stages one after the other: `stage.steps` optimizer steps each (times `accumulation`
    batches), every batch from one dataset drawn by the stage's `mix` (weights per data.datasets entry) and
    one group of equal reference sizes."""

    def __init__(self, groups: dict[Any, list[int]], batch_size: int, stages: list[Any], seed: int,
                 accumulation: int = 1) -> None:  # fmt: skip
        self.groups, self.batch_size, self.stages, self.seed, self.epoch = groups, batch_size, stages, seed, 0
        self.accumulation = accumulation
        self.datasets = sorted({d for d, _ in groups})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(s.steps for s in self.stages) * self.accumulation

    def __iter__(self) -> Any:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        for stage in self.stages:
            mix = list(stage.mix) if stage.mix else [1.0] * (max(self.datasets) + 1)
            usable = [d for d in self.datasets if d < len(mix) and mix[d] > 0]
            if not usable:
                raise UserError(f"training.dreamo.stages: stage '{stage.name}' mixes no dataset that has items")
            for _ in range(stage.steps * self.accumulation):
                d = rng.choices(usable, [mix[u] for u in usable])[0]
                keys = [k for k in self.groups if k[0] == d]
                key = rng.choices(keys, [len(self.groups[k]) for k in keys])[0]
                pool = self.groups[key]
                yield [rng.choice(pool) for _ in range(self.batch_size)]
