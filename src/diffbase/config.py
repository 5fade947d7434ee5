"""Load YAML configs with `_base_` inheritance and `key=value` overrides, validated into dataclasses.

Every key remembers the file that set it, so an error names the file and the dotted key:
`configs/experiments/x.yaml: training.learning_rat: unknown key (did you mean 'learning_rate'?)`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffbase.errors import UserError, closest

COMMAND_LINE = "command line"


# --------------------------------------------------------------------------- schema


@dataclass
class ExperimentConfig:
    name: str = "run"
    output_dir: str = "outputs/run"
    seed: int = 0


@dataclass
class ModelConfig:
    """A backbone: its family, where its weights are, and the sizes to build it from."""

    family: str  # a registered family (diffbase.models.families)
    variant: str = ""
    pretrained_path: str | None = None
    single_file: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Frozen weights in fewer bits: none | fp8 | int8 | qint8 | nf4 for the denoiser, or per component
    # ({denoiser: int8, t5: fp8}); see diffbase.models.quantize.
    quantize: str | dict[str, str] = "none"
    text_max_length: int | None = None  # T5 tokens (FLUX.1, SD3.5); None: the family's (512, 256)
    word_tokenizer: bool = False  # tiny tokenizers with the synthetic captions' words as single tokens
    random_weights: bool = False  # build from the config with random weights (speed tests); tiny variants always may
    # Keyword arguments of the diffusers / transformers classes, by component.
    unet: dict[str, Any] | None = None
    transformer: dict[str, Any] | None = None
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoders: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # null removes one
    scheduler: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    type: Literal["adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor", "adamw_schedulefree"] = "adamw"
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # adamw: torch's fused kernel; null: where torch has it for the device (CUDA, CPU), false: never, true: required
    fused: bool | None = None


@dataclass
class ScheduleConfig:
    """Linear warm-up from `warmup_start` x lr, then cosine (or constant) down to `floor` (absolute lr); or
    one of diffusers' schedules by name (`get_scheduler`: warm-up from 0, no floor)."""

    type: Literal["cosine", "constant", "linear", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                  "piecewise_constant"] = "cosine"  # fmt: skip
    num_cycles: int = 1  # cosine_with_restarts
    power: float = 1.0  # polynomial
    step_rules: str | None = None  # piecewise_constant, e.g. "1:10,0.1:20,0.01" (diffusers' syntax)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # alternative to warmup_steps, in epochs of the training data
    warmup_start: float = 0.1
    floor: float = 0.0


@dataclass
class ObjectiveConfig:
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None  # None: resolution-dependent shift from the scheduler config (flow)
    snr_gamma: float | None = None  # min-SNR weighting (epsilon / v-prediction)
    guidance: float = 1.0  # FLUX dev guidance-embedding value during training
    noise_offset: float = 0.0  # adds offset x N(0, 1) per sample and channel to the noise


@dataclass
class EmaConfig:
    """An exponential moving average of what trains; when on, validation and every export use it."""

    enabled: bool = False
    decay: float = 0.9999
    update_every: int = 1  # optimizer steps between EMA updates
    start_step: int = 0  # until this step the average is the weights themselves


@dataclass
class ValidationConfig:
    every: int = 0  # steps between checks; 0: only at the end
    prompts: list[str] = field(default_factory=list)  # images are made only when prompts are given
    control_images: list[str] = field(default_factory=list)  # ControlNet: default the first training controls
    seed: int = 0
    steps: int = 20
    guidance: float | None = None
    size: list[int] | None = None  # [height, width]; default data.resolution square
    loss_split: float = 0.0  # held-out fraction of the images for the validation loss
    loss_timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Metrics of the validation images, logged as val_<name> and plotted; each method computes those that fit what
    # it validates (a one-line refusal names them). Text-to-image: clip_t (against the prompts; needs `clip`), fid and
    # kid (against up to 64 training images, in the features of `features`: dino:DIR, clip:DIR or inception:FILE).
    # Held-out items with a ground truth (tryon, dreamfit, upscale, kontext, fill, dreamo): ssim, psnr, lpips (needs
    # `lpips`). DreamO: clip_i and dino of each result against its references (needs `clip` / `dino`), clip_t
    # against its caption.
    metrics: list[Literal["clip_t", "fid", "kid", "ssim", "psnr", "lpips", "clip_i", "dino"]] = field(
        default_factory=list
    )
    clip: str | None = None  # a local CLIP folder (model, processor, tokenizer)
    features: str | None = None  # KIND:PATH, the network of fid / kid
    lpips: str | None = (
        None  # NET:FILE, torchvision's weights of LPIPS's backbone (squeeze:/models/squeezenet1_1-b8a52dc0.pth)
    )
    dino: str | None = None  # a local DINOv2 folder, for the dino score


# Method sections: each method module registers the dataclass of its `training.<section>` keys, and
# its name for `training.method` (diffbase.methods.registry.register), so a new method is one module.
SECTIONS: dict[str, type] = {}
METHOD_NAMES: list[str] = []


def register_section(name: str, cls: type) -> None:
    """`training.<name>` is validated as `cls` (a dataclass whose fields all have defaults)."""
    if name in {f.name for f in dataclasses.fields(TrainingConfig)}:
        raise ValueError(f"training.{name} is a built-in key, not a method section")
    SECTIONS[name] = cls


def register_method_name(name: str) -> None:
    if name not in METHOD_NAMES:
        METHOD_NAMES.append(name)


# Old names of methods and their sections, still read: {"vton": "tryon", "upscale_dino": "upscale"}.
ALIASES: dict[str, str] = {}


def register_alias(old: str, name: str) -> None:
    ALIASES[old] = name


# What registers every family and method name (set by the package root, diffbase/__init__.py, so this core module
# names no layer above it); the first load_config calls it (a method module imported alone registers only itself).
NAME_LOADERS: list[typing.Callable[[], object]] = []

# Family names: each family module registers its own (diffbase.models.families), so a new family is one module.
FAMILY_NAMES: list[str] = []


def register_family_name(name: str) -> None:
    if name not in FAMILY_NAMES:
        FAMILY_NAMES.append(name)


@dataclass
class TrainingConfig:
    method: str = "lora"  # one of the registered methods (diffbase.methods)
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint_every: int = 500
    export_every: int = 0  # steps between exports to OUTPUT_DIR/exports/step-N, each with its validation grid
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # non-finite losses in a row before the run stops
    sections: dict[str, Any] = field(default_factory=dict, repr=False)  # the registered method sections

    def __getattr__(self, name: str) -> Any:  # training.lora, training.tryon, ... (registered sections)
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            sections[name] = SECTIONS[name]()
            return sections[name]
        raise AttributeError(name)

    def __post_init__(self) -> None:  # a count or rate no run can use stops it at load, before the model loads
        check_training_numbers(self)


def check_training_numbers(t: TrainingConfig) -> None:
    """Whole counts at least 1 and a learning rate above 0: max_steps 0 'trained' and exported an untouched
    adapter, and a batch of 0 or a negative rate failed as a traceback inside the loop."""
    ends = ("max_steps",) if t.max_steps is not None else ("epochs",)  # max_steps set: epochs is not read
    counts = ("batch_size", "gradient_accumulation", *ends)
    for key in counts:
        if getattr(t, key) < 1:
            raise UserError(f"training.{key}: expected a whole number at least 1, got {getattr(t, key)}")
    if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
        raise UserError(f"training.learning_rate: expected a number above 0, got {t.learning_rate}")


@dataclass
class DatasetConfig:
    path: str
    weight: float = 1.0
    repeats: int = 1


@dataclass
class DataConfig:
    train_path: str | None = None  # shorthand for one dataset
    datasets: list[DatasetConfig] = field(default_factory=list)
    resolution: int | list[int] = 512  # pixels per side (area about resolution^2); a list trains at each size
    bucket_step: int = 64  # 0 turns bucketing off: every image is cropped square
    min_bucket_side: int = 256
    max_bucket_side: int = 2048
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    caption_dropout: float = 0.0
    trigger: str | None = None  # replaces [trigger] in every caption; put first where a caption lacks it
    shuffle_captions: bool = False  # comma-separated tags in a new order each time (not with cache_text)
    keep_tags: int = 0  # shuffle_captions: the first tags stay in place
    on_bad_file: Literal["skip", "fail"] = "skip"
    masked_loss: bool = False
    cache_latents: bool = False
    cache_text: bool = False
    cache_dir: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:  # a bad size stops the run at load, before the model loads
        check_resolution(self.resolution, self.bucket_step)


def check_resolution(value: int | list[int], step: int) -> None:
    """data.resolution: one size or a non-empty list, each at least 8 pixels and, with buckets, at least
    data.bucket_step (the smallest side a bucket can have)."""
    sizes = [value] if isinstance(value, int) else list(value)
    if not sizes:
        raise UserError("data.resolution: expected a size or a non-empty list of sizes, got []")
    for size in sizes:
        if size < 8:
            raise UserError(f"data.resolution: {size} is too small (expected at least 8 pixels)")
        if step > 0 and size < step:
            raise UserError(f"data.resolution: {size} is smaller than data.bucket_step ({step})")


# The design document's spellings, read as diffbase's names (`config show` prints the canonical ones).
KEY_ALIASES: dict[type, dict[str, str]] = {
    DataConfig: {
        "bucket_resolution_steps": "bucket_step",
        "min_bucket_resolution": "min_bucket_side",
        "max_bucket_resolution": "max_bucket_side",
    },
}


def register_key_alias(cls: type, old: str, name: str) -> None:
    """`old` under a `cls` section reads as `name` (a method section's own spellings)."""
    KEY_ALIASES.setdefault(cls, {})[old] = name


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto: cuda when torch sees one, else cpu (one process per GPU under accelerate/torchrun)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool | Literal["auto"] = False  # auto: on only when one step without it runs out of memory
    attention_backend: str = "auto"  # auto, flash, efficient, cudnn, math, or a diffusers attention backend name
    # model: text encoders and VAE wait on the CPU between uses; blocks: also the frozen weights of the
    # denoiser's blocks after the first `keep_blocks`, each brought over as it runs (needs checkpointing)
    offload: Literal["none", "model", "blocks"] = "none"
    keep_blocks: int = 0  # offload blocks: blocks that stay on the GPU
    # torch.compile each repeated block of the denoiser (regional compilation); true is the default mode,
    # reduce-overhead adds CUDA graphs (diffbase.compile)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False


Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)


@dataclass
class LoggingConfig:
    """Where the training metrics go besides metrics.jsonl (always written): accelerate's trackers."""

    report_to: list[Tracker] | Tracker = field(default_factory=lambda: ["tensorboard"])  # [] for metrics.jsonl only
    project: str | None = None  # W&B project / MLflow experiment; None: experiment.name
    run_name: str | None = None  # None: the tracker names the run
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a file store at OUTPUT_DIR/mlruns
    # the loss, its terms and the grad norm stay on the device and are read every N optimizer steps (and before
    # every checkpoint, validation, export, the end and a failure); every step still gets its metrics.jsonl row
    read_every: int = 10

    def __post_init__(self) -> None:  # `report_to: wandb` reads as [wandb]; each tracker once
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        self.report_to = list(dict.fromkeys(names))
        if isinstance(self.read_every, int) and self.read_every < 1:
            raise UserError(f"logging.read_every: expected an integer >= 1, got {self.read_every}")


@dataclass
class Config:
    model: ModelConfig
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- loading


def configs_dir() -> Path:
    """The shipped configs: inside the wheel, or at the repository root in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    raise UserError(f"shipped configs not found next to {here}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected a YAML config in UTF-8)") from None
    except OSError as exc:  # unreadable (permissions, I/O): one line, not a traceback
        raise UserError(f"{path}: cannot read the config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, sources: dict[str, str], origin: str, prefix: str = "") -> None:
    """Deep-merge src into dst in place; record which file set each dotted key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, sources, origin, dotted + ".")
        else:
            dst[key] = _copy(value)
            _mark(value, dotted, sources, origin)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _mark(value: Any, dotted: str, sources: dict[str, str], origin: str) -> None:
    sources[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{dotted}.{k}", sources, origin)


def load_raw(path: str | Path, sources: dict[str, str] | None = None, _seen: tuple = ()) -> dict:
    """Read a YAML file with its `_base_` files merged in order, the file itself last."""
    path = Path(path).resolve()
    if path in _seen:
        raise UserError(f"{path}: _base_ includes itself (cycle through {' -> '.join(p.name for p in _seen)})")
    sources = {} if sources is None else sources
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: _base_: expected a list of relative paths")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise UserError(f"{path}: _base_: file not found: {base}")
        _merge(merged, load_raw(base_path, sources, (*_seen, path)), {}, "")
    _merge(merged, data, sources, str(path))
    # Keys set only by bases keep their own origin (recorded by the recursive call).
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """`training.learning_rate=1e-4` -> ("training.learning_rate", 0.0001). Values are YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value, for example training.batch_size=2")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str], sources: dict[str, str]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"{COMMAND_LINE}: {'.'.join(parts[: i + 1])}: is a value, cannot set '{key}'")
            node = child
        node[parts[-1]] = value
        _mark(value, key, sources, COMMAND_LINE)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, inherit, override and validate an experiment or model config."""
    sources: dict[str, str] = {}
    data = load_raw(path, sources)
    apply_overrides(data, overrides or [], sources)
    while NAME_LOADERS:  # once per process: a config read from Python before (some) methods were imported
        NAME_LOADERS.pop(0)()
    return validate(Config, data, sources, default_origin=str(Path(path).resolve()))


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    return load_config(path, overrides).model


# --------------------------------------------------------------------------- validation


def _origin(sources: dict[str, str], dotted: str, default: str) -> str:
    probe = dotted
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return default


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, dotted: str, sources: dict[str, str], default_origin: str) -> Any:
    def fail() -> UserError:
        where = _origin(sources, dotted, default_origin)
        return UserError(f"{where}: {dotted}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return validate(tp, value, sources, dotted + ".", default_origin)
    if origin is Literal:
        if value not in typing.get_args(tp):
            where = _origin(sources, dotted, default_origin)
            hint = closest(str(value), [str(a) for a in typing.get_args(tp)])
            raise UserError(f"{where}: {dotted}: expected {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, dotted, sources, default_origin)
            except UserError:
                continue
        raise fail()
    if origin is list:
        if not isinstance(value, list | tuple):
            raise fail()
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{dotted}[{i}]", sources, default_origin) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, item = typing.get_args(tp) or (str, Any)
        return {k: _convert(item, v, f"{dotted}.{k}", sources, default_origin) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in the schema, not user input


def validate(cls: type, data: dict, sources: dict[str, str], prefix: str = "", default_origin: str = "") -> Any:
    """Build dataclass `cls` from `data`, or raise a one-line UserError naming file and key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    open_sections = SECTIONS if cls is TrainingConfig else {}
    data = aliased(cls, dict(data), sources, prefix, default_origin)
    if cls is TrainingConfig:
        data = renamed(data)
        data = lifted_learning_rate(data, sources, prefix, default_origin)
    sections = {}
    for key in list(data):
        if key in open_sections:
            value = data.pop(key)
            sections[key] = _convert(open_sections[key], value, f"{prefix}{key}", sources, default_origin)
        elif key not in fields or key == "sections":
            where = _origin(sources, f"{prefix}{key}", default_origin)
            known = [f for f in fields if f != "sections"] + list(open_sections)
            raise UserError(f"{where}: {prefix}{key}: unknown key{closest(str(key), known)}")
    if cls is ModelConfig and "family" in data:
        check_name(data["family"], FAMILY_NAMES, "family", sources, prefix, default_origin)
    if cls is TrainingConfig:
        check_name(data.get("method", "lora"), METHOD_NAMES, "method", sources, prefix, default_origin)
        data["sections"] = {name: sections.get(name) or section() for name, section in SECTIONS.items()}
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted, sources, default_origin)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = _origin(sources, prefix.rstrip("."), default_origin) if prefix else default_origin
            raise UserError(f"{where}: {dotted}: required value is missing")
    return cls(**kwargs)


def renamed(data: dict) -> dict:
    """`training.method` and a section under an old name (ALIASES) read as the new one."""
    if data.get("method") in ALIASES:
        data["method"] = ALIASES[data["method"]]
    for old, name in ALIASES.items():
        if old not in data:
            continue
        value = data.pop(old)
        both = isinstance(value, dict) and isinstance(data.get(name), dict)
        data[name] = {**data[name], **value} if both else value  # an old-name override wins, as it came later
    return data


def aliased(cls: type, data: dict, sources: dict[str, str], prefix: str, default_origin: str) -> dict:
    """Keys spelled as the design document spells them (KEY_ALIASES) read under diffbase's names."""
    for old, name in KEY_ALIASES.get(cls, {}).items():
        if old in data:
            take(data, old, data.pop(old), name, sources, prefix, default_origin)
    return data


def lifted_learning_rate(data: dict, sources: dict[str, str], prefix: str, default_origin: str) -> dict:
    """`training.optimizer.lr` (the design document's full fine-tuning example) is training.learning_rate."""
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and "lr" in optimizer:
        optimizer = data["optimizer"] = dict(optimizer)
        take(data, "optimizer.lr", optimizer.pop("lr"), "learning_rate", sources, prefix, default_origin)
    return data


def take(data: dict, old: str, value: Any, name: str, sources: dict[str, str], prefix: str, origin: str) -> None:
    """`old`'s value as `name`'s. With both set differently, the one set on the command line wins, else the
    design document's spelling (shipped base configs use diffbase's); both in one file is an error."""
    old_from, name_from = _origin(sources, prefix + old, origin), sources.get(prefix + name)
    if name in data and data[name] != value:
        if old_from == name_from:
            raise UserError(f"{old_from}: {prefix}{old}: the same setting as {prefix}{name}, which is also set "
                            f"({data[name]!r} and {value!r}); keep one")  # fmt: skip
        if name_from == COMMAND_LINE:
            return
    data[name] = value
    sources[prefix + name] = old_from


def check_name(
    name: Any, known: list[str], key: str, sources: dict[str, str], prefix: str, default_origin: str
) -> None:
    """A registered name (a method, a family), or one line naming the file, the key and the closest."""
    if name not in known:
        where = _origin(sources, f"{prefix}{key}", default_origin)
        choices = ", ".join(repr(m) for m in known)
        raise UserError(f"{where}: {prefix}{key}: expected one of {choices}, got {name!r}{closest(str(name), known)}")


def to_dict(config: Any) -> dict:
    """Plain data, method sections back under `training` where the YAML has them."""
    data = dataclasses.asdict(config)
    training = (
        data.get("training") if isinstance(config, Config) else data if isinstance(config, TrainingConfig) else None
    )
    if training is not None:
        training.update(training.pop("sections", {}))
    return data


def dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one flat mapping of dotted keys (`training.learning_rate`); an empty mapping stays a value.
    For what takes one level only: MLflow's params, a printed table."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
