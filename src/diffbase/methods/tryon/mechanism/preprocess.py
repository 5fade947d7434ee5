"""Try-on geometry as CatVTON prepares its inputs, for inference and for the datasets alike:

- person (and its mask, pose, ground truth): centre-cropped to the target aspect ratio with integer
  arithmetic, then resized with LANCZOS (`crop_to_aspect`); the crop box is kept so the result can
  be pasted back at the person's own size (`paste_back`);
- garment: resized with LANCZOS to fit inside the target and centred on white (`fit_and_pad`), so a
  garment shot of another aspect ratio keeps its shape;
- mask: binarised at 0.5 after resizing; optionally blurred first and binarised again, as CatVTON's
  app does (`soften_mask`; a Gaussian blur of radius 9 here, PIL's, which is close to but not the
  same filter as the app's OpenCV kernel).
"""

from __future__ import annotations

from PIL import Image, ImageFilter


def crop_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred box of `size` (w, h) with the aspect ratio of `target` (w, h), integer arithmetic."""
    w, h = size
    tw, th = target
    if w / h < tw / th:
        nw, nh = w, w * th // tw
    else:
        nw, nh = h * tw // th, h
    return (w - nw) // 2, (h - nh) // 2, (w + nw) // 2, (h + nh) // 2


def crop_to_aspect(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Centre crop to the aspect ratio of `target` (w, h), then LANCZOS to that size."""
    return image.crop(crop_box(image.size, target)).resize(target, Image.LANCZOS)


def fit_and_pad(
    image: Image.Image, target: tuple[int, int], fill: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Resize to fit inside `target` (w, h) keeping the aspect ratio (LANCZOS), centred on `fill`."""
    w, h = image.size
    tw, th = target
    nw, nh = (w * th // h, th) if w / h < tw / th else (tw, h * tw // w)
    canvas = Image.new("RGB", target, fill)
    canvas.paste(image.convert("RGB").resize((nw, nh), Image.LANCZOS), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def binarize(mask: Image.Image) -> Image.Image:
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def soften_mask(mask: Image.Image, radius: float = 9) -> Image.Image:
    """Blur, then binarise again at 0.5: closes small holes and smooths the edge of a parsed mask."""
    return binarize(mask.convert("L").filter(ImageFilter.GaussianBlur(radius)))


def paste_back(result: Image.Image, person: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The model's result (at `target`, a crop of the person) back into the person at its own size and
    aspect ratio: resized to the crop box and pasted there; outside the box the person is unchanged."""
    box = crop_box(person.size, target)
    out = person.convert("RGB").copy()
    out.paste(result.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
    return out
