"""What every model-running command (and the web UI's tabs) checks before it loads a model: numbers in range,
sizes the family can take, readable images of a usable shape, masks and boxes that mark something, and
output paths that can be written. Each check raises a one-line UserError naming `name`: the command's flag,
or the web UI's field label."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from diffbase.errors import UserError
from diffbase.io import writable_folder

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_ASPECT = 8.0  # longest side / shortest side a pipeline is given (a 5000x3 image has no latent rows)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def count(value: int, name: str, least: int = 1, most: int | None = None) -> int:
    """A whole number of at least `least` (and at most `most`): steps, tiles, resolutions."""
    if value is None or value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise UserError(f"{name}: expected a whole number {bound}, got {value}")
    return value


def number(
    value: float | None, name: str, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False,
) -> float | None:  # fmt: skip
    """A finite number in a range; `*_open` leaves that end out. None (the pipeline's default) passes."""
    if value is None:
        return None
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        left = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f"in {left}, {right}" if low is not None and high is not None else (
            f"{'above' if low_open else 'at least'} {low:g}" if low is not None else f"at most {high:g}")  # fmt: skip
        raise UserError(f"{name}: expected a number {where}, got {value}")
    return value


def size(text: str, name: str, multiple: int = 8, least: int = 16) -> tuple[int, int]:
    """`HxW` -> (height, width), each a multiple of what the family needs: rounded to the nearest one
    with a note saying so (a 63x65 request does not silently become something else)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except (ValueError, AttributeError):
        raise UserError(f"{name}: expected HxW such as 512x512, got '{text}'") from None
    if h < least or w < least:
        raise UserError(f"{name}: expected each side at least {least} px, got '{text}'")
    rh, rw = (max(multiple, round(v / multiple) * multiple) for v in (h, w))
    if (rh, rw) != (h, w):
        note(f"{name} {h}x{w} is rounded to {rh}x{rw} (this model needs multiples of {multiple} px)")
    return rh, rw


def image(
    path: str | None, name: str, max_pixels: int | None = None, max_aspect: float | None = MAX_ASPECT,
    show_path: bool = True,
) -> Any:  # fmt: skip
    """A readable image (PIL, RGB) within the pixel limit, its sides at most `max_aspect` apart. `show_path`
    False leaves the file's path out of the message (the web UI's uploads sit in the server's temp folder)."""
    from diffbase.data.images import BadFile, image_size, load_image

    if not path:
        raise UserError(f"{name}: give an image")
    file = Path(path)
    what = f"{name}: {file}" if show_path else f"{name}: the image"
    try:
        w, h = image_size(file)
        if max_pixels is not None and w * h > max_pixels:
            raise UserError(f"{what} is {w}x{h}, beyond the limit of {max_pixels} pixels")
        if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
            raise UserError(f"{what} is {w}x{h}; expected sides at most {max_aspect:g} times apart")
        return load_image(file)
    except BadFile as err:
        raise UserError(f"{name}: {file}: {err.reason}" if show_path else f"{name}: {err.reason}") from None


def mask(path: str, name: str, image_size: tuple[int, int], show_path: bool = True) -> Any:
    """A readable mask of the image's size that marks something (white: the area to change)."""
    from diffbase.data.images import BadFile, load_mask

    try:
        m = load_mask(Path(path))
    except BadFile as err:
        raise UserError(f"{name}: {err.path}: {err.reason}" if show_path else f"{name}: {err.reason}") from None
    if m.size != tuple(image_size):
        raise UserError(f"{name}: the mask is {m.size[0]}x{m.size[1]} (WxH) but the image is "
                        f"{image_size[0]}x{image_size[1]}; expected the same size")  # fmt: skip
    if m.convert("L").getextrema()[1] < 128:
        raise UserError(f"{name}: the mask is empty (no pixel above 127); white marks the area to change")
    return m


def box(text: str, name: str, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`x0,y0,x1,y1` in pixels, inside the image and not empty."""
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name}: expected x0,y0,x1,y1 in pixels, got '{text}'") from None
    w, h = image_size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise UserError(f"{name}: {text} is not a box inside the {w}x{h} image (expected 0 <= x0 < x1 <= {w}, "
                        f"0 <= y0 < y1 <= {h})")  # fmt: skip
    return x0, y0, x1, y1


def output(path: str | None, name: str, inputs: list[str] = (), overwrite: bool = False) -> Path | None:
    """An output file that can be written: a known image suffix, not a folder, not one of the inputs, not an
    existing file (unless `overwrite`), in a folder that exists or can be made (not a new top-level folder),
    where a file can be created now (before minutes of computing)."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"{name}: {out} has no image suffix; expected one of {', '.join(OUTPUT_SUFFIXES)}")
    if out.is_dir():
        raise UserError(f"{name}: {out} is a folder; expected a file name")
    resolved = out.resolve()
    for given in inputs:
        if given and Path(given).resolve() == resolved:
            raise UserError(f"{name}: {out} is also an input; write the result to another file")
    if out.exists() and not overwrite:
        raise UserError(f"{name}: {out} exists; give another name, or --overwrite to replace it")
    writable_folder(out.parent, name)  # made when the result is written; here only whether it could be
    return out


TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# The first bytes of a legacy (non-zip) torch.save file: protocol 2, then torch's magic number as a long.
LEGACY_TORCH = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def weights_file(path: str | None, name: str) -> None:
    """A weights file is safetensors or a torch.save archive (zip, or the legacy format), which the loaders
    read with weights_only=True; in a folder, every such file is checked (any other file is not the
    loaders')."""
    if not path:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{name}: {p} not found")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TENSOR_SUFFIXES) if p.is_dir() else [p]
    for f in files:
        readable_tensors(f, name)


def readable_tensors(f: Path, name: str) -> None:
    """A weights file that can be read and is safetensors or a torch.save archive (one line naming it, else)."""
    try:
        with open(f, "rb") as handle:
            head = handle.read(len(LEGACY_TORCH))
    except OSError as err:  # permissions, an I/O error: said as such, not as a file of the wrong kind
        raise UserError(f"{name}: {f} cannot be read ({err.strerror or err})") from None
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt"):
                return
        except Exception:
            raise UserError(f"{name}: {f} is not a safetensors file") from None
    import zipfile

    if not (zipfile.is_zipfile(f) or head == LEGACY_TORCH):  # a plain pickle or anything else: not weights
        raise UserError(f"{name}: {f} is not a PyTorch weights file (expected safetensors or a torch.save archive)")


def model_folder(path: str, name: str = "--model", family: str | None = None, job: str = "") -> Any:
    """The family spec of a local diffusers folder, read from its model_index.json (no weights loaded);
    with `family`, a folder of another family is refused (`job`: what runs on it, for the message)."""
    from diffbase.models.folders import detect_family

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{name}: {folder} not found (expected a local diffusers folder)")
    if not folder.is_dir():
        return None  # a single file: checked when it loads
    spec = detect_family(folder)
    if family is not None and spec.family != family:
        raise UserError(f"{name}: {job} runs on {family_title(family)} models; {path} holds a "
                        f"{spec.family} model")  # fmt: skip
    return spec


def family_title(family: str) -> str:
    from diffbase.models import families

    return families.get(family).title


def size_multiple(spec: Any) -> int:
    """What a family's sides must be a multiple of: the VAE's 8 px, times 2 for the transformers' 2x2 patches."""
    from diffbase.models import families

    return 8 if spec is None else families.get(spec.family).size_multiple


def runtime(args: Any) -> Any:
    """The command's Runtime (device, dtype, attention, offload), resolved and checked before loading, and
    kept as `args.runtime` for the load that follows."""
    from diffbase.runtime import from_arguments

    args.runtime = from_arguments(args)
    return args.runtime
