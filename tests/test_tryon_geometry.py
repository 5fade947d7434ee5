"""Try-on as CatVTON runs it: only the person half of the latent canvas is decoded, inputs are cropped
(person, mask) or fitted and padded (garment) to the model's aspect, the result goes back at the
person's own size, and `--seed-mode catvton` draws the VAE samples as CatVTON's scripts do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffbase.methods.tryon.mechanism import canvas as C
from diffbase.methods.tryon.mechanism import preprocess as P
from diffbase.methods.tryon.mechanism import sampling
from diffbase.methods.tryon.mechanism.sampling import TryOnSettings, tryon
from diffbase.methods.tryon.method import VTON
from diffbase.models import backbone as B


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: ANN001, ANN201
    return VTON.load(str(tiny_model("sd15")), None, "catvton")


def inputs(w: int = 48, h: int = 64) -> dict[str, Image.Image]:
    person = Image.new("RGB", (w, h), (200, 170, 150))
    ImageDraw.Draw(person).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(40, 90, 200))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    garment = Image.new("RGB", (20, 40), (220, 30, 30))  # another aspect ratio than the model's
    return {"person": person, "mask": mask, "garment": garment}


def test_only_the_person_half_is_decoded(model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    seen, original = {}, C.top_half

    def top_half(canvas: torch.Tensor) -> torch.Tensor:
        seen["canvas"] = canvas
        return original(canvas)

    monkeypatch.setattr(sampling.C, "top_half", top_half)
    g = torch.Generator().manual_seed(0)
    person, garment = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float()
    result = tryon(model, "catvton", person, garment, mask, TryOnSettings(steps=3, repaint=False))
    canvas = seen["canvas"]
    assert canvas.shape[-2] == 2 * canvas.shape[-1]  # person over garment
    torch.testing.assert_close(result, B.decode_latents(model, canvas[..., : canvas.shape[-2] // 2, :]))
    whole = original(B.decode_latents(model, canvas))  # what decoding the canvas and cropping gives
    assert (whole - result).abs().max() > 1e-3


def test_a_garment_of_another_aspect_keeps_it() -> None:
    padded = np.asarray(P.fit_and_pad(Image.new("RGB", (20, 40), (220, 30, 30)), (32, 32)))
    red = (padded[..., 1] < 128).nonzero()
    assert (red[0].min(), red[0].max() + 1) == (0, 32)  # full height
    assert (red[1].min(), red[1].max() + 1) == (8, 24)  # 16 wide: 20:40 kept, centred, white beside it
    assert (padded[:, :8] == 255).all() and (padded[:, 24:] == 255).all()
    assert P.crop_box((48, 64), (32, 32)) == (0, 8, 48, 56)  # the person: centred, integer arithmetic


def test_the_person_comes_back_at_its_own_size(model) -> None:  # noqa: ANN001
    data = inputs()
    out = VTON.run(model, data, TryOnSettings(steps=2, repaint=False), (32, 32))
    assert out.size == data["person"].size
    person, result = np.asarray(data["person"]), np.asarray(out)
    assert (result[:8] == person[:8]).all() and (result[56:] == person[56:]).all()  # outside the crop box
    assert (result[8:56] != person[8:56]).any()
    kept = np.asarray(VTON.run(model, data, TryOnSettings(steps=2), (32, 32)))  # repaint: only the mask changes
    outside = np.asarray(data["mask"]) < 128
    assert (kept[outside] == person[outside]).all() and (kept[~outside] != person[~outside]).any()


def test_seed_mode_catvton_is_deterministic_and_its_own(model) -> None:  # noqa: ANN001
    data = inputs()
    runs = [np.asarray(VTON.run(model, data, TryOnSettings(steps=2, seed_mode=m), (32, 32))) for m in ("catvton",) * 2]
    assert (runs[0] == runs[1]).all()
    default = np.asarray(VTON.run(model, data, TryOnSettings(steps=2), (32, 32)))
    assert (default != runs[0]).any()


def test_soften_mask_closes_holes() -> None:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    mask.putpixel((32, 32), 0)  # a one-pixel hole, as a parser leaves
    soft = P.soften_mask(mask)
    assert soft.getpixel((32, 32)) == 255 and set(np.unique(np.asarray(soft))) <= {0, 255}
