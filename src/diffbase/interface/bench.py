"""What the GPU benchmark's stages share (benchmarks/gpu.py runs them; a method package's bench.py adds its own):
the context that collects rows and metrics, timing and peak memory, MFU, the benchmark's training config,
diffbase's `train()` measured from where its loop starts (and, asked, a torch.profiler trace of a few of its
steps), and the shared FLUX.1 pipeline with random weights."""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from diffbase.config import Config, configs_dir, load_config
from diffbase.training.seam import Method

GIB = 2**30
PROMPT = "a photo of a woman in a red dress"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s, SXM


@dataclass(frozen=True)
class Sizes:
    """What every stage shares: the FLUX.1 model and the training run's size; a method's own sizes live in its
    bench module (tiny ones for --tiny)."""

    flux1_model: str
    train_res: int
    train_steps: int
    images: int
    val_steps: int
    warmup_steps: int = 2  # training steps left out of s/step
    sample_warmup_steps: int = 2  # sampling steps of each warm-up call


FULL = Sizes(flux1_model="models/flux1_dev.yaml", train_res=1024, train_steps=8, images=8, val_steps=3)
TINY = Sizes(flux1_model="models/flux1_tiny.yaml", train_res=64, train_steps=5, images=4, val_steps=2,
             sample_warmup_steps=1)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One benchmark stage: `run(ctx)` adds its rows and metrics; `flux1` says it uses the shared FLUX.1
    pipeline (those stages run together, before the training stages, so the pipeline is built once and
    freed before training needs the memory); `ratios`: (measure, metric, goal) rows it feeds, the metric
    a ratio to plain generation."""

    name: str
    run: Callable[[Context], None]
    flux1: bool = False
    ratios: tuple[tuple[str, str, float], ...] = ()


@dataclass
class Row:
    stage: str
    measure: str
    value: str
    goal: str = ""
    result: str = ""


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    tiny: bool
    work: Path
    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # objects handed from one stage to the next
    notes: list[str] = field(default_factory=list)  # lines under the title
    artifacts: Path | None = None  # where files beside the table go (profiler traces); None: `work`

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        memory = ""
        if self.cuda:
            memory = f" [{torch.cuda.memory_allocated(self.device) / GIB:.1f} GiB allocated]"
        print(f"[{self.elapsed():6.1f} s] {message}{memory}", flush=True)

    def add(self, stage: str, measure: str, value: str, goal: str = "", result: str = "") -> None:
        self.rows.append(Row(stage, measure, value, goal, result))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / GIB:.1f} GiB"


def flop_text(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f} FLOP"


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def step_seconds(step_ends: list[float], warmup: int) -> tuple[float, int]:
    """Median step time from perf_counter() stamps at the end of each step, the first `warmup` steps
    left out (step k lasts from the end of step k-1 to its own end), and how many steps that is."""
    durations = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:], strict=True)]
    if len(durations) < 2:
        raise RuntimeError(f"{len(step_ends)} training steps finished; need at least {warmup + 2}")
    return statistics.median(durations), len(durations)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The bf16 dense peak of this GPU, when it is one we know."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, name


def mfu(ctx: Context, flops: float | None, seconds: float) -> str:
    peak, name = peak_flops(ctx.device)
    if not ctx.cuda:
        return "n/a (CPU)"
    if flops is None:
        return "n/a (no FLOP count: the plain stage failed)"
    if peak is None:
        return f"n/a (no bf16 peak known for {name})"
    return f"{100 * flops / seconds / peak:.1f} % ({flops / seconds / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f})"


def verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "FAIL"


def write_images(folder: Path, count: int, size: int) -> Path:
    """A small captioned image folder: coloured shapes on plain backgrounds."""
    colours = {"red": (205, 40, 40), "blue": (40, 80, 210), "green": (40, 160, 60), "yellow": (235, 205, 40)}
    backgrounds = {"white": (245, 245, 245), "grey": (128, 128, 128)}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = list(colours)[i % len(colours)]
        background = list(backgrounds)[(i // len(colours)) % len(backgrounds)]
        shape = ("square", "circle")[i % 2]
        img = Image.new("RGB", (size, size), backgrounds[background])
        draw = ImageDraw.Draw(img)
        a, b = size * (2 + i % 3) // 10, size * (7 + i % 2) // 10
        (draw.rectangle if shape == "square" else draw.ellipse)([a, a, b, b], fill=colours[colour])
        img.save(folder / f"{i:03d}.jpg", quality=95)
        (folder / f"{i:03d}.txt").write_text(f"a {colour} {shape} on a {background} background")
    return folder


def train_config(ctx: Context, experiment: str, name: str, *extra: str) -> Config:
    """An experiment config at benchmark settings: random weights, bf16, batch 1, rank 16, a few steps,
    one validation image at the end, no checkpoints in between."""
    return load_config(configs_dir() / experiment, bench_overrides(ctx, name, *extra))


def bench_overrides(ctx: Context, name: str, *extra: str) -> list[str]:
    """train_config's settings (the benchmark's image folder written on first use)."""
    s = ctx.sizes
    data = ctx.shared.get("data") or write_images(ctx.work / "data", s.images, s.train_res)
    ctx.shared["data"] = data
    return [
        f"experiment.output_dir={ctx.work / name}",
        "experiment.seed=0",
        f"data.train_path={data}",
        f"data.resolution={s.train_res}",
        "model.random_weights=true",
        "model.dtype=bfloat16",
        f"hardware.device={ctx.device}",
        "hardware.mixed_precision=bf16",
        "hardware.gradient_checkpointing=false",
        "training.batch_size=1",
        "training.gradient_accumulation=1",
        f"training.max_steps={s.train_steps}",
        "training.lora.rank=16",
        "training.lora.alpha=16",
        "training.checkpoint_every=0",
        "training.schedule.type=constant",
        "training.schedule.warmup_steps=0",
        "training.validation.every=0",
        f"training.validation.prompts=[{PROMPT}]",
        f"training.validation.steps={s.val_steps}",
        f"training.validation.size=[{s.train_res},{s.train_res}]",
        "training.validation.loss_split=0",
        *extra,
    ]


PROFILE_STEPS = 3  # training steps recorded by the profiler, after the timed ones
PROFILE_TOP = 8  # rows of the "where the time goes" table
STREAM_SYNC = "cudaStreamSynchronize"  # the host waits for the GPU: a read of a device value, or a blocking copy


@contextlib.contextmanager
def profiled_steps(device: torch.device, first: int, count: int) -> Iterator[dict[str, Any]]:
    """torch.profiler over the training loop's steps `first` .. `first + count - 1` (0-based calls of `loop.step`,
    with what the loop does between them: logging, reads); the device is synchronized before it stops, so every
    kernel of those steps is in. Yields a dict that holds the profiler once it recorded them."""
    import diffbase.training.loop as L

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    real, state = L.step, {"calls": 0}
    profiler = torch.profiler.profile(activities=activities)

    def step(*args: Any, **kwargs: Any) -> Any:
        if state["calls"] == first:
            profiler.start()
            state["started"] = True
        try:
            return real(*args, **kwargs)
        finally:
            state["calls"] += 1
            if state["calls"] == first + count:
                sync(device)
                profiler.stop()
                state["profiler"] = profiler

    L.step = step
    try:
        yield state
    finally:
        L.step = real
        if state.get("started") and "profiler" not in state:  # the run ended before the last profiled step
            profiler.stop()


def where_time_goes(profiler: Any, steps: int, cuda: bool, top: int = PROFILE_TOP) -> dict[str, Any]:
    """The ops with the most self time (the device's on CUDA, else the CPU's) per profiled step, in ms and as a share
    of all self time; on CUDA, the times per step the host waited for the GPU (stream synchronizations)."""
    events = profiler.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    ops = [(e.key, getattr(e, attr) / 1000.0 / steps, 100.0 * getattr(e, attr) / total) for e in ranked]
    syncs = sum(e.count for e in events if e.key == STREAM_SYNC) / steps if cuda else None
    return {"ops": ops, "clock": "CUDA" if cuda else "CPU", "stream_syncs": syncs}


def save_profile(ctx: Context, recorded: dict[str, Any], profile: Path, steps_run: int) -> dict[str, Any]:
    """The profiled steps' chrome trace written to `profile`, and where their time went."""
    if "profiler" not in recorded:
        raise RuntimeError(f"the profiled steps did not run ({steps_run} steps)")
    profile.parent.mkdir(parents=True, exist_ok=True)
    recorded["profiler"].export_chrome_trace(str(profile))
    return where_time_goes(recorded["profiler"], PROFILE_STEPS, ctx.cuda) | {"trace": profile}


def check_outputs(out: Path, export: str, validation: bool) -> None:
    """A benchmarked run wrote its export (and validation images): else its timing measured a broken run."""
    exports = json.loads((out / "exports.json").read_text()) if (out / "exports.json").is_file() else {}
    if not exports.get(export) or not Path(exports[export]).exists():
        raise RuntimeError(f"no {export} export in {out}")
    if validation and not list((out / "validation").glob("*.png")):
        raise RuntimeError(f"no validation image in {out / 'validation'}")


def diffbase_train(
    ctx: Context,
    config: Config,
    method: Method,
    export: str = "diffusers",
    validation: bool = True,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One run of diffbase's `train(config)`, with the peak memory of its training loop (the loop is
    wrapped so the peak is reset where it starts: model building and caching are left out). `profile`: a chrome
    trace of PROFILE_STEPS more steps after the timed ones goes there, and `info["profile"]` says where the time
    went in them (the timing, s/step, is of the steps before)."""
    import diffbase.training.train as T

    timed_steps = config.training.max_steps
    if profile is not None:
        config = replace(config, training=replace(config.training, max_steps=timed_steps + PROFILE_STEPS))
    real, seen = getattr(T, "run_training", None), {}

    def measured(*args: Any, **kwargs: Any) -> Any:
        seen["setup_peak"] = peak_bytes(ctx.device)  # building the model and filling the cache
        reset_peak(ctx.device)
        seen["loop_start"] = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seen["peak"] = peak_bytes(ctx.device)

    start = time.perf_counter()
    reset_peak(ctx.device)
    if real is not None:  # else the loop moved: the peak then covers the whole run, model building included
        T.run_training = measured
    recording = profiled_steps(ctx.device, timed_steps, PROFILE_STEPS) if profile else contextlib.nullcontext({})
    try:
        with recording as recorded:
            result = T.train(config, method, show_progress=False)
    finally:
        if real is not None:
            T.run_training = real
    seen.setdefault("peak", peak_bytes(ctx.device))
    sync(ctx.device)
    wall = time.perf_counter() - start
    check_outputs(Path(config.experiment.output_dir), export, validation)
    info = run_info(ctx, config, result, timed_steps, seen) | {
        "wall": wall,
        "setup": seen.get("loop_start", start) - start,
    }
    if profile is not None:
        info["profile"] = save_profile(ctx, recorded, profile, len(result.step_times))
    for attr in ("backbone", "trained"):  # the model goes now, not when the result does
        if hasattr(result, attr):
            setattr(result, attr, None)
    del result
    free(ctx.device)
    return info


def run_info(ctx: Context, config: Config, result: Any, timed_steps: int, seen: dict[str, Any]) -> dict[str, Any]:
    """What a benchmarked run measured: s/step over its timed steps, peaks, skips and checkpointing."""
    seconds, counted = step_seconds(result.step_times[:timed_steps], ctx.sizes.warmup_steps)
    return {
        "s_step": seconds,
        "counted": counted,
        "peak": seen.get("peak"),
        "run_peak": None if seen["peak"] is None else max(seen["peak"], seen.get("setup_peak") or 0.0),
        "skipped": result.skipped_nonfinite,
        "checkpointing": bool(getattr(result.backbone.denoiser, "is_gradient_checkpointing", False)),
        "family": config.model.family,
        "steps_run": len(result.step_times),
    }


def report_profile(ctx: Context, stage: str, label: str, info: dict[str, Any]) -> None:
    """The profiled steps of a `diffbase_train(..., profile=...)` run: the trace's path, where the time goes (the top
    ops by self time per step) and how often the host waited for the GPU."""
    p = info["profile"]
    about = f"{label}, {PROFILE_STEPS} steps after the timed ones"
    ctx.add(stage, f"{about}: torch.profiler chrome trace (gzipped JSON)", str(p["trace"]))
    for name, ms, share in p["ops"]:
        ctx.add(stage, f"where the time goes ({about}, self {p['clock']} time per step): {name}",
                f"{ms:.3f} ms ({share:.1f}%)")  # fmt: skip
    waits = "n/a (CPU: no device to wait for)" if p["stream_syncs"] is None else f"{p['stream_syncs']:.2f}"
    ctx.add(stage, f"{about}: {STREAM_SYNC} per step (the host waits for the GPU: reads, blocking copies)", waits)


def report_diffbase(ctx: Context, stage: str, label: str, info: dict[str, Any], flops: float | None) -> None:
    s = ctx.sizes
    ctx.add(
        stage,
        f"{label}: s/step (median of {info['counted']} after {s.warmup_steps} warm-up)",
        f"{info['s_step']:.3f}",
    )
    ctx.add(stage, f"{label}: peak memory in the training loop", gib(info["peak"]))
    ctx.add(stage, f"{label}: peak memory over the whole run (building the model included)", gib(info["run_peak"]))
    ctx.add(stage, f"{label}: MFU", mfu(ctx, flops, info["s_step"]))
    ctx.add(
        stage,
        f"{label}: whole `train()` (setup {info['setup']:.0f} s: build and cache; {info['steps_run']} steps; validation; "
        "export)",
        f"{info['wall']:.1f} s",
    )
    if info["skipped"]:
        ctx.add(stage, f"{label}: steps skipped for a non-finite loss", str(info["skipped"]))


def flux1_pipeline(ctx: Context) -> tuple[Any, Any]:
    """The FLUX.1 pipeline with random bf16 weights, built on the device; shared by generate and dreamfit."""
    if "flux1_pipe" in ctx.shared:
        return ctx.shared["flux1_pipe"]
    from diffbase.models.build import build_pipeline
    from diffbase.models.specs import spec_for

    config = load_config(configs_dir() / ctx.sizes.flux1_model, ["model.dtype=bfloat16", "model.random_weights=true"])
    with torch.device(ctx.device):
        pipe = build_pipeline(config.model, seed=0)
    pipe.set_progress_bar_config(disable=True)
    ctx.shared["flux1_pipe"] = pipe, spec_for(config.model.family, config.model.variant)
    return ctx.shared["flux1_pipe"]


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int, device: torch.device) -> dict:
    """Seconds of each, alternating which goes first, and the median of the per-pair ratios."""
    mine, base, ratios = [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            b, o = timed(theirs, device), timed(ours, device)
        else:
            o, b = timed(ours, device), timed(theirs, device)
        mine.append(o)
        base.append(b)
        ratios.append(o / b)
    return {"ours": statistics.median(mine), "theirs": statistics.median(base), "ratio": statistics.median(ratios)}
