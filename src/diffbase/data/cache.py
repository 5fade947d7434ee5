"""On-disk cache of VAE posteriors and text conditioning, in safetensors shards keyed by content.

A latent's key hashes the image file's bytes, how it is cut (bucket, crop mode) and the VAE's
identity; a prompt's key hashes the text and the text encoders' identity. Changing one image,
the crop settings or a model changes exactly the keys that depend on it, so only those are
computed again. Shards are written whole under a temporary name and renamed; the index is read
from the shards' headers, so there is no separate index file to fall out of step.

The posterior (mean, std) is cached rather than one sample, so training still draws a fresh
latent every step, exactly as without the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbase.errors import UserError
from diffbase.io import file_digest

PREPROCESS_VERSION = 1  # bump when resizing/cropping code changes what a cached latent holds
SHARD_BYTES = 512 * 2**20


def module_fingerprint(module: torch.nn.Module | None) -> str:
    """The identity of a model: its config and, per tensor, name, shape, dtype and a strided sample
    of values. Cheap for multi-GB models, and any real fine-tune changes it."""
    h = hashlib.sha256()
    if module is None:
        return "none"
    config = getattr(module, "config", None)
    if config is not None:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # `_`-keys are bookkeeping (diffusers' `_use_default_values` is a set, ordered by the hash seed)
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        if type(tensor) is not torch.Tensor and hasattr(tensor, "dequantize"):  # a quantized base (model.quantize)
            tensor = tensor.dequantize()
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].float().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


def key_of(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


@dataclass
class ShardStore:
    """Tensors grouped under keys (`KEY/name`), in any number of safetensors shards in one folder."""

    root: Path
    locations: dict[str, Path] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)  # key -> tensor names under it
    damaged: dict[str, str] = field(default_factory=dict)  # key -> shard, for entries whose checksum failed
    _open: dict[Path, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path) -> ShardStore:
        """Every entry whose checksum matches what was written. A damaged entry (or a whole unreadable
        shard) is left out, so it is computed again, and listed in `damaged`."""
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        bad: dict[str, str] = {}
        for shard in sorted(root.glob("shard-*.safetensors")):
            for key, (names, ok) in verified_entries(shard).items():
                if ok:
                    store.locations[key] = shard
                    store.names[key] = names
                else:
                    bad.setdefault(key, shard.name)
        store.damaged = {k: v for k, v in bad.items() if k not in store.locations}
        return store

    def __contains__(self, key: str) -> bool:
        return key in self.locations

    def get(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        shard = self.locations[key]
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), framework="pt")
        f = self._open[shard]
        return {n.rsplit("/", 1)[1]: f.get_tensor(n) for n in self.names[key]}

    def write(self, entries: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write entries as new shards of about SHARD_BYTES each (atomically, one file at a time)."""
        from safetensors.torch import save_file

        from diffbase.io import atomic_write

        for chunk in _chunks(entries, SHARD_BYTES):
            tensors = {
                f"{k}/{n}": t.detach().cpu().contiguous().clone() for k, d in chunk.items() for n, t in d.items()
            }
            sums = {
                k: entry_digest((f"{k}/{n}", tensor_bytes(tensors[f"{k}/{n}"])) for n in sorted(d))
                for k, d in chunk.items()
            }
            shard = self.root / f"shard-{key_of(*sorted(chunk))[:16]}.safetensors"
            meta = {CHECKSUMS: json.dumps(sums, sort_keys=True)}
            atomic_write(shard, lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
            for k, d in chunk.items():
                self.locations[k] = shard
                self.names[k] = [f"{k}/{n}" for n in d]


CHECKSUMS = "diffbase.sha256"  # shard metadata: {key: sha256 of its tensors' names and bytes}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def entry_digest(parts: Iterable[tuple[str, Any]]) -> str:
    """The sha256 of an entry's tensors, name and bytes, in name order: the same over the tensors being
    written and over their bytes read back from the file."""
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def verified_entries(shard: Path) -> dict[str, tuple[list[str], bool]]:
    """The entries of one shard: key -> (tensor names, whether its bytes match the checksum written with
    it). Read straight from the safetensors layout (8-byte header length, JSON header, data) in one pass.
    An unreadable shard has no usable entries; one written before checksums is read unverified."""
    import mmap

    try:
        with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(bytes(data[8 : 8 + n]))
            meta = header.pop("__metadata__", None) or {}
            if CHECKSUMS not in meta:  # written before checksums: read as it is
                names_only: dict[str, list[str]] = {}
                for name in sorted(header):
                    names_only.setdefault(name.rsplit("/", 1)[0], []).append(name)
                return {key: (members, True) for key, members in names_only.items()}
            sums = json.loads(meta[CHECKSUMS])
            base, names = 8 + n, {}
            for name in sorted(header):
                names.setdefault(name.rsplit("/", 1)[0], []).append(name)
            out = {}
            for key, members in names.items():
                parts = []
                for name in members:
                    start, end = header[name]["data_offsets"]
                    if base + end > len(data):
                        raise ValueError("cut short")
                    parts.append((name, data[base + start : base + end]))
                out[key] = (members, sums.get(key) == entry_digest(parts))
            return out
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _chunks(entries: dict[str, dict[str, torch.Tensor]], limit: int) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    chunk: dict[str, dict[str, torch.Tensor]] = {}
    size = 0
    for key, tensors in entries.items():
        chunk[key] = tensors
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        if size >= limit:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


@dataclass
class CacheStats:
    latents_computed: int = 0
    latents_reused: int = 0
    prompts_computed: int = 0
    prompts_reused: int = 0
    damaged: list[str] = field(default_factory=list)  # "shard: key" of entries whose checksum failed

    def summary(self) -> str:
        text = (
            f"latents: {self.latents_computed} computed, {self.latents_reused} reused; "
            f"prompts: {self.prompts_computed} computed, {self.prompts_reused} reused"
        )
        if self.damaged:
            text += f"; {len(self.damaged)} damaged entries recomputed (first: {self.damaged[0]})"
        return text

    def note_damaged(self, store: ShardStore, needed: Iterable[str]) -> None:
        """Count the damaged entries this dataset needed (each is computed again)."""
        self.damaged += [f"{store.damaged[k]}: {k}" for k in needed if k in store.damaged]


@dataclass
class TrainingCache:
    """What the training loop reads instead of running the VAE and text encoders."""

    latents: ShardStore | None
    text: ShardStore | None
    latent_keys: dict[str, list[str | None]]  # per slot, per dataset index (None: the record lacks it)
    text_identity: str
    backbone: Any

    def prompt_key(self, prompt: str) -> str:
        return key_of("prompt", prompt, self.text_identity)

    def lookup(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any] | None]:
        """(mean, std, cond) for a batch; None where that part is not cached."""
        mean = std = cond = None
        if self.latents is not None:
            mean, std = self.posterior(batch, "image")
        if self.text is not None:
            cond = self.conditioning(batch["caption"], batch.get("size"))
        return mean, std, cond

    def conditioning(self, prompts: list[str], size: Any = None) -> dict[str, Any]:
        """The cached text conditioning of these prompts, batched, on the backbone's device."""
        from diffbase.models import backbone as B

        parts = [self.text.get(self.prompt_key(c)) for c in prompts]
        cond = {}
        for name in parts[0]:
            if name.startswith("shared."):  # batch-independent tensors (FLUX.1 text ids)
                cond[name[len("shared.") :]] = parts[0][name]
            else:
                cond[name] = torch.cat([p[name] for p in parts])
        cond |= B.size_conditioning(self.backbone, size, len(parts))  # SDXL's time ids
        from diffbase.models.placement import to_device

        device = self.backbone.device
        return {k: to_device(v, device) for k, v in cond.items()}  # queued: the host does not wait for the GPU

    def posterior(self, batch: dict[str, Any], slot: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached VAE posterior (mean, std) of one image slot (`image`, `reference`, ...) of a batch."""
        keys = self.latent_keys.get(slot)
        if keys is None or any(keys[i] is None for i in batch["index"]):
            raise KeyError(f"slot '{slot}' is not cached for every item of this batch")
        parts = [self.latents.get(keys[i]) for i in batch["index"]]
        return torch.stack([p["mean"] for p in parts]), torch.stack([p["std"] for p in parts])

    def tensors(self, batch: dict[str, Any], slot: str) -> dict[str, torch.Tensor]:
        """Every tensor cached under one slot's keys for a batch, stacked, on the backbone's device (a
        method's own entries, such as DreamFit's person and reference latents)."""
        keys = self.latent_keys[slot]
        parts = [self.latents.get(keys[i]) for i in batch["index"]]
        return {name: torch.stack([p[name] for p in parts]).to(self.backbone.device) for name in parts[0]}


def check_cacheable(config: Any) -> None:
    d = config.data
    if d.cache_latents and (d.crop != "center" or d.random_flip):
        raise UserError(
            "data.cache_latents: a cached latent is one fixed cut of the image; use data.crop: center "
            "and data.random_flip: false, or turn the latent cache off"
        )


def text_identity(bb: Any) -> str:
    parts = [bb.family]
    for te in bb.spec.text_encoders:
        tok = getattr(bb.pipe, te.tokenizer, None)
        parts += [module_fingerprint(getattr(bb.pipe, te.component, None)), len(tok) if tok is not None else 0]
    return key_of(*parts)


def slot_keys(dataset: Any, slots: tuple[str, ...], identity: str) -> dict[str, list[str | None]]:
    """A latent key per slot and item: the file's content, its cut (bucket) and the VAE; None where a
    record has no such slot. The slot's name is not part of the key: one file is one latent."""
    digests: dict[Path, str] = {}
    keys: dict[str, list[str | None]] = {slot: [] for slot in slots}
    for i, rec in enumerate(dataset.records):
        for slot in slots:
            path = rec.slots.get(slot)
            if path is not None and path not in digests:
                digests[path] = file_digest(path)
            bucket = slot_bucket(dataset, i, slot)
            keys[slot].append(key_of("latent", digests[path], bucket, identity) if path is not None else None)
    return keys


def slot_bucket(dataset: Any, i: int, slot: str) -> tuple[int, int]:
    """The bucket a slot of item i is cut to (a slot may have its own: TrainDataset.bucket_slots_separately)."""
    return dataset.bucket_for(i, slot) if hasattr(dataset, "bucket_for") else dataset.bucket_of[i]


def latent_identity(config: Any, bb: Any) -> str:
    d = config.data
    return key_of(PREPROCESS_VERSION, d.crop, module_fingerprint(bb.vae))


def batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def build_cache(
    config: Any, bb: Any, dataset: Any, show_progress: bool = True, slots: tuple[str, ...] = ("image",)
) -> tuple[TrainingCache, CacheStats]:
    """Compute what is missing from the cache for this dataset and model, on the compute device (also
    when offload parks the encoders on the CPU); reuse the rest. `slots`: the image slots whose
    latents are cached (a key per slot and item; one file in two slots is one entry)."""
    from diffbase.models.placement import encoders_on

    with encoders_on(bb):
        return _build_cache(config, bb, dataset, show_progress, slots)


def _build_cache(
    config: Any, bb: Any, dataset: Any, show_progress: bool, slots: tuple[str, ...]
) -> tuple[TrainingCache, CacheStats]:
    from tqdm import tqdm

    from diffbase.models import backbone as B

    check_cacheable(config)
    d, stats = config.data, CacheStats()
    root = Path(d.cache_dir or Path(config.experiment.output_dir) / "cache")
    batch = max(1, min(8, config.training.batch_size))
    latents = text = None
    latent_keys: dict[str, list[str | None]] = {}
    if d.cache_latents:
        latents = ShardStore.open(root / "latents")
        latent_keys = slot_keys(dataset, slots, latent_identity(config, bb))
        todo: dict[str, tuple[int, str]] = {}
        for slot, keys in latent_keys.items():
            for i, key in enumerate(keys):
                if key is not None and key not in latents and key not in todo:
                    todo[key] = (i, slot)
        every = {k for keys in latent_keys.values() for k in keys if k is not None}
        stats.note_damaged(latents, todo)
        stats.latents_computed, stats.latents_reused = len(todo), len(every) - len(todo)
        by_bucket: dict[tuple[int, int], list[tuple[str, int, str]]] = {}
        for key, (i, slot) in todo.items():
            by_bucket.setdefault(slot_bucket(dataset, i, slot), []).append((key, i, slot))
        bar = tqdm(total=len(todo), desc="cache latents", unit="img", disable=not show_progress or not todo)
        for entries in by_bucket.values():
            for group in batches(entries, batch):
                items = [dataset.item(i, pixels=True) for _, i, _ in group]
                ok = [(key, it["pixels" if slot == "image" else slot]) for (key, _, slot), it in zip(group, items, strict=True) if it is not None]  # fmt: skip
                if ok:
                    mean, std = B.encode_distribution(bb, torch.stack([px for _, px in ok]))
                    latents.write({key: {"mean": m, "std": s} for (key, _), m, s in zip(ok, mean, std, strict=True)})
                bar.update(len(group))
        bar.close()
    if d.cache_text:
        text = ShardStore.open(root / "text")
    cache = TrainingCache(latents, text, latent_keys, text_identity(bb), bb)
    if text is not None:
        prompts = {r.caption for r in dataset.records} | ({""} if d.caption_dropout > 0 else set())
        stats.note_damaged(text, {cache.prompt_key(p) for p in prompts})
        stats.prompts_computed, stats.prompts_reused = cache_prompts(cache, prompts, batch, show_progress)
    return cache, stats


def build_item_cache(
    config: Any,
    bb: Any,
    dataset: Any,
    tag: tuple[Any, ...],
    encode: Any,
    prompts: set[str],
    show_progress: bool = True,
    group: Any = None,
) -> tuple[TrainingCache, CacheStats]:
    """A method's own cache, one entry per item (slot "pair"): `encode(batch)` -> {name: tensor per
    item} for what the step would otherwise encode from the item's images, keyed by every file of the
    record, its box, `tag` (what else changes the result: mode, size) and the VAE; and `prompts` in
    the text cache. Entries are computed only where missing (the encoders then back on the accelerator
    when offload parked them). `group(i)`: items are encoded in one batch only when their groups are
    equal (DreamO's items with other reference sizes do not stack)."""
    from tqdm import tqdm

    from diffbase.models.placement import encoders_on

    d, stats = config.data, CacheStats()
    root = Path(d.cache_dir or Path(config.experiment.output_dir) / "cache")
    batch = max(1, min(8, config.training.batch_size))
    latents = text = None
    keys: list[str | None] = []
    with encoders_on(bb):
        if d.cache_latents:
            latents = ShardStore.open(root / "latents")
            identity, digests = latent_identity(config, bb), {}
            for rec in dataset.records:
                files = [f"{slot}:{digests.setdefault(p, file_digest(p))}" for slot, p in sorted(rec.slots.items())]
                keys.append(key_of(*tag, rec.box, *files, identity))
            todo = [i for i, key in enumerate(keys) if key not in latents]
            stats.note_damaged(latents, {keys[i] for i in todo})
            stats.latents_computed, stats.latents_reused = len(todo), len(keys) - len(todo)
            dataset.load_pixels = True  # to compute what is missing
            bar = tqdm(total=len(todo), desc="cache latents", unit="item", disable=not show_progress or not todo)
            groups: dict[Any, list[int]] = {}
            for i in todo:
                groups.setdefault(group(i) if group is not None else None, []).append(i)
            for chunk in (c for members in groups.values() for c in batches(members, batch)):
                items = [dataset[i] for i in chunk]
                for i, item in zip(chunk, items, strict=True):
                    if item is None:
                        keys[i] = None
                done = dataset.collate(items)
                if done["index"]:
                    with torch.no_grad():
                        encoded = encode(done)
                    latents.write({keys[i]: {n: t[j] for n, t in encoded.items()} for j, i in enumerate(done["index"])})
                bar.update(len(chunk))
            bar.close()
        if d.cache_text:
            text = ShardStore.open(root / "text")
        cache = TrainingCache(latents, text, {"pair": keys}, text_identity(bb), bb)
        if text is not None:
            stats.note_damaged(text, {cache.prompt_key(p) for p in prompts})
            stats.prompts_computed, stats.prompts_reused = cache_prompts(cache, prompts, batch, show_progress)
    return cache, stats


def cache_prompts(cache: TrainingCache, prompts: Iterable[str], batch: int, show_progress: bool) -> tuple[int, int]:
    """Encode the prompts the text cache lacks; returns (computed, reused)."""
    from tqdm import tqdm

    from diffbase.models import backbone as B

    bb, prompts = cache.backbone, sorted(set(prompts))
    missing = [p for p in prompts if cache.prompt_key(p) not in cache.text]
    bar = tqdm(total=len(missing), desc="cache prompts", unit="prompt", disable=not show_progress or not missing)
    for group in batches(missing, batch):
        cond = B.encode_prompts(bb, group)
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for j, prompt in enumerate(group):
            entry = {}
            for name, value in cond.items():
                if name in bb.behaviour.batchless:  # conditioning without a batch dimension
                    entry[f"shared.{name}"] = value
                else:
                    entry[name] = value[j : j + 1]
            entries[cache.prompt_key(prompt)] = entry
        cache.text.write(entries)
        bar.update(len(group))
    bar.close()
    return len(missing), len(prompts) - len(missing)


def free_encoders(bb: Any, latents: bool, text: bool, keep_for_validation: bool) -> None:
    """After caching, the VAE encoder and text encoders are not needed for training. They are deleted,
    or, when validation images will need them, moved off the accelerator to the CPU."""
    if text:
        for te in bb.spec.text_encoders:
            module = getattr(bb.pipe, te.component, None)
            if module is None:
                continue
            if keep_for_validation:
                module.to("cpu")
            else:
                setattr(bb.pipe, te.component, None)
    if latents:
        if keep_for_validation:
            bb.vae.encoder.to("cpu")
        else:
            bb.vae.encoder = None
            bb.vae.decoder = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
