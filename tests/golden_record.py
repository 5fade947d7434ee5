"""Behaviour records that hold on any CPU: what a run computed (losses, exported weights, pictures), recorded
once and compared later with tolerances that CPU kernels cannot break but a change of behaviour does.

Why tolerances and not bits: the same code gives other float bits with other SIMD kernels (torch picks
AVX-512, AVX2 or plain code by the CPU; `ATEN_CPU_CAPABILITY` forces one). Measured on the 29 records with
all three kernel sets on one AMD EPYC (tests/golden/README.md has the table):

- losses differ by at most 8.8e-6 relative (74 float32 ulps; DreamBooth's first loss already differs, since
  its class images are sampled by the base model). LOSS_RTOL = 1e-4 leaves an 11x margin; a changed noise draw,
  timestep, weighting or learning rate moves these losses by 1e-3 to 1e-1.
- exported weights differ by at most 0.61 of the learning rate after 3 steps: Adam moves a weight by about
  lr per step whatever the gradient's size, so where a gradient is near zero two CPUs can take steps of
  different sign. So every sampled weight must lie within lr x steps (WEIGHT_STEPS_TOL), and in each tensor
  at most 2 samples (or 1%, where more are kept) may differ by more than lr/100 (measured: at most 1 sample in
  any tensor, 0.04% of all weights). A change of behaviour, even in one tensor, moves most of that tensor's
  weights by a sizeable part of lr, so it fails the second bound.
- pictures differ by at most 1 level in at most 0.3% of channel values: PIXEL_LEVELS = 2 and PIXEL_FRACTION =
  0.01 give a margin of 2x and 3x.

Weights are kept as a sample of up to SAMPLE elements per tensor (positions drawn by a generator seeded
from the tensor's name, the same on every machine) with every tensor's shape, so the record stays small
(full tensors would be 20 MB).
"""

from __future__ import annotations

import json
import math
import platform
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

GOLDEN = Path(__file__).resolve().parent / "golden"
LOSS_RTOL = 1e-4
WEIGHT_STEPS_TOL = 1.0  # in learning rates per step run
WEIGHT_BULK_FRACTION = 0.01
WEIGHT_BULK_MIN = 2  # samples per tensor that may differ by more than WEIGHT_BULK_TOL
WEIGHT_BULK_TOL = 0.01  # in learning rates
PIXEL_LEVELS = 2
PIXEL_FRACTION = 0.01
SAMPLE = 64


def cpu_name() -> str:
    """The CPU model and the kernel set torch uses on it, noted in each record."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def sample(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLE elements of a tensor at positions that depend only on its name and size."""
    flat = tensor.detach().float().reshape(-1)
    if flat.numel() <= SAMPLE:
        return flat.clone()
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return flat[torch.randperm(flat.numel(), generator=g)[:SAMPLE].sort().values].clone()


def assert_pixels_close(got: Any, want: Any, what: str = "image") -> None:
    """Images (arrays or PIL images) equal within PIXEL_LEVELS in every channel value, and equal exactly in
    all but PIXEL_FRACTION: what two code paths computing the same thing give on any CPU."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, recorded {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= PIXEL_LEVELS, f"{what}: a pixel differs by {diff.max()} levels (tolerance {PIXEL_LEVELS})"
    frac = float((diff > 0).mean())
    assert frac <= PIXEL_FRACTION, f"{what}: {frac:.2%} of the channel values differ (tolerance {PIXEL_FRACTION:.0%})"


def assert_weights_close(got: torch.Tensor, want: torch.Tensor, lr: float, steps: int, what: str = "weights") -> None:
    """One tensor's trained weights equal as far as Adam lets two reduction orders agree: every element within
    lr x steps, and all but WEIGHT_BULK_MIN (or WEIGHT_BULK_FRACTION) within lr/100 (the docstring says why)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().reshape(-1)
    if not diff.numel():
        return
    bound = WEIGHT_STEPS_TOL * lr * steps
    assert float(diff.max()) <= bound, f"{what}: a weight differs by {float(diff.max()):.3g} (> lr x steps)"
    off = int((diff > WEIGHT_BULK_TOL * lr).sum())
    allowed = max(WEIGHT_BULK_MIN, math.ceil(WEIGHT_BULK_FRACTION * diff.numel()))
    assert off <= allowed, f"{what}: {off} of {diff.numel()} weights differ by more than lr/100 (allowed {allowed})"


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class Record:
    """One named behaviour: losses (with the learning rate and steps that bound weight differences),
    exported weights by file and tensor, and pictures."""

    def __init__(self, name: str, lr: float = 0.0, steps: int = 0) -> None:
        self.name, self.lr, self.steps = name, lr, steps
        self.losses: list[float] = []
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.images: dict[str, np.ndarray] = {}

    @property
    def slug(self) -> str:
        return self.name.replace("/", "__")

    def save(self) -> None:
        """Write this record (DIFFBASE_RECORD=1): its entry in behaviour.json, its weight samples and PNGs."""
        import fcntl

        GOLDEN.mkdir(exist_ok=True)
        with open(GOLDEN / ".lock", "w") as lock:  # recording under pytest-xdist: one writer at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._save()

    def _save(self) -> None:
        from safetensors.torch import load_file, save_file

        index_path, weights_path = GOLDEN / "behaviour.json", GOLDEN / "weights.safetensors"
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        samples = load_file(str(weights_path)) if weights_path.exists() else {}
        samples = {k: v for k, v in samples.items() if not k.startswith(f"{self.name}|")}
        shapes = {}
        for file, tensors in self.weights.items():
            shapes[file] = {}
            for tensor_name, t in tensors.items():
                shapes[file][tensor_name] = list(t.shape)
                samples[f"{self.name}|{file}|{tensor_name}"] = sample(tensor_name, t)
        for key, pixels in self.images.items():
            (GOLDEN / "images").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(GOLDEN / "images" / f"{self.slug}__{key}.png")
        index[self.name] = {"cpu": cpu_name(), "losses": self.losses, "lr": self.lr, "steps": self.steps,
                            "weights": shapes, "images": sorted(self.images)}  # fmt: skip
        index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        save_file(dict(sorted(samples.items())), str(weights_path))

    def check(self) -> None:
        """Compare with the record, with the tolerances this module states."""
        from safetensors.torch import load_file

        index = json.loads((GOLDEN / "behaviour.json").read_text())
        assert self.name in index, f"{self.name}: not recorded in {GOLDEN / 'behaviour.json'}"
        want = index[self.name]
        where = f"{self.name} (recorded on {want['cpu']}; here {cpu_name()})"
        assert len(self.losses) == len(want["losses"]), f"{where}: {len(self.losses)} losses"
        for step, (got, rec) in enumerate(zip(self.losses, want["losses"], strict=True), 1):
            assert abs(got - rec) <= LOSS_RTOL * abs(rec), f"{where}: loss at step {step} {got!r}, recorded {rec!r}"
        shapes = {f: {n: list(t.shape) for n, t in ts.items()} for f, ts in self.weights.items()}
        assert shapes == want["weights"], f"{where}: the exported files, tensors or shapes differ"
        samples = load_file(str(GOLDEN / "weights.safetensors"))
        for file, tensors in self.weights.items():
            for tensor_name, t in tensors.items():
                recorded = samples[f"{self.name}|{file}|{tensor_name}"]
                assert_weights_close(sample(tensor_name, t), recorded, want["lr"], want["steps"],
                                     f"{where}, {file} {tensor_name}")  # fmt: skip
        assert sorted(self.images) == want["images"], f"{where}: pictures {sorted(self.images)}"
        for key, pixels in self.images.items():
            assert_pixels_close(pixels, rgb(GOLDEN / "images" / f"{self.slug}__{key}.png"), f"{where}, {key}")
