"""`diffbase edit` and `diffbase inpaint`: the same pixels as diffusers' pipelines loaded from the same
folders, the training conditioning equal to what those pipelines feed their transformers, and bad
input as one-line errors that write nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.data.datasets import to_tensor
from diffbase.methods.edit.mechanism import prepare_fill_conditioning, prepare_kontext_conditioning
from diffbase.models import backbone as B
from diffbase.models.loading import load_pipeline
from tests.golden_record import assert_pixels_close
from tests.helpers import first_transformer_call, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("editing")
    rng = np.random.default_rng(0)
    out = {}
    for name, size in (("small", 32), ("ref_a", 64), ("ref_b", 64)):
        out[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out[name])
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out["mask"] = root / "mask.png"
    mask.save(out["mask"])
    Image.new("L", (32, 32), 0).save(root / "empty.png")
    Image.new("L", (48, 32), 255).save(root / "wide.png")
    out["empty"], out["wide"], out["root"] = root / "empty.png", root / "wide.png", root
    return out


CASES = {
    # Kontext resizes the reference to its preferred resolutions (the pipeline's default, kept)
    "kontext": ("flux1-kontext", "edit", ["--image", "small", "--size", "32x32"],
                {"image": ["small"], "height": 32, "width": 32, "max_area": 32 * 32}),
    "flux2": ("flux2", "edit", ["--image", "ref_a", "--size", "32x32"], {"image": [["ref_a"]], "height": 32, "width": 32}),
    "klein-two-references": (
        "flux2-klein", "edit", ["--image", "ref_a", "--image", "ref_b", "--size", "32x32"],
        {"image": [["ref_a", "ref_b"]], "height": 32, "width": 32},
    ),
    "fill": ("flux1-fill", "inpaint", ["--image", "small", "--mask", "mask"],
             {"image": ["small"], "mask_image": ["mask"], "height": 32, "width": 32, "strength": 1.0}),
    "klein-inpaint": (
        "flux2-klein-inpaint", "inpaint", ["--image", "small", "--mask", "mask", "--reference", "ref_a"],
        {"image": ["small"], "mask_image": ["mask"], "image_reference": [["ref_a"]], "height": 32, "width": 32,
         "strength": 1.0},
    ),
}  # fmt: skip


def _resolve(value, files):  # noqa: ANN001, ANN202
    """["name"] -> the opened image, [["a", "b"]] -> a list of them; anything else as it is."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [Image.open(files[n]).convert("RGB") for n in value[0]]
    if isinstance(value, list):
        image = Image.open(files[value[0]])
        return image.convert("L") if value[0] == "mask" else image.convert("RGB")
    return value


@pytest.mark.parametrize("case", list(CASES))
def test_same_pixels_as_the_diffusers_pipeline(case, tiny_model, files, tmp_path) -> None:
    name, command, argv, kwargs = CASES[case]
    folder = tiny_model(name)
    args = [files.get(a, a) for a in argv]
    out = tmp_path / "ours.png"
    code, _, err = run_cli(command, "--model", str(folder), *map(str, args), "--prompt", "a red shirt",
                           "--steps", "2", "--seed", "3", "--out", str(out), "--grid", str(tmp_path / "grid.png"))  # fmt: skip
    assert code == 0, err
    pipe, spec = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    call = {k: _resolve(v, files) for k, v in kwargs.items()}
    with torch.inference_mode():
        expected = pipe(prompt="a red shirt", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3),
                        **call, **B.text_length(pipe, spec.family)).images[0]  # fmt: skip
    assert_pixels_close(Image.open(out).convert("RGB"), expected)
    assert Image.open(out).size == (32, 32)  # --size is the result's size (Kontext too)
    assert (tmp_path / "grid.png").is_file()


def test_kontext_conditioning_is_what_the_pipeline_feeds(tiny_model, files) -> None:
    pipe, spec = load_pipeline(tiny_model("flux1-kontext"))
    image = Image.open(files["small"]).convert("RGB")
    seen = first_transformer_call(pipe, image=image, _auto_resize=False, max_area=32 * 32)
    bb = B.Backbone(spec, pipe)
    with torch.no_grad():
        c = prepare_kontext_conditioning([to_tensor(image)[None]], bb, "cpu", torch.float32)
    count = seen["kwargs"]["hidden_states"].shape[1] - c.tokens.shape[1]
    torch.testing.assert_close(c.tokens, seen["kwargs"]["hidden_states"][:, count:])
    torch.testing.assert_close(c.token_ids, seen["kwargs"]["img_ids"][count:])


def test_flux2_conditioning_of_several_references_is_what_the_pipeline_feeds(tiny_model, files) -> None:
    pipe, spec = load_pipeline(tiny_model("flux2-klein"))
    refs = [Image.open(files[n]).convert("RGB") for n in ("ref_a", "ref_b")]
    seen = first_transformer_call(pipe, image=refs)
    bb = B.Backbone(spec, pipe)
    with torch.no_grad():
        c = prepare_kontext_conditioning([to_tensor(r)[None] for r in refs], bb, "cpu", torch.float32)
    hidden, ids = seen["kwargs"]["hidden_states"], seen["kwargs"]["img_ids"]
    count = hidden.shape[1] - c.tokens.shape[1]
    torch.testing.assert_close(c.tokens, hidden[:, count:])
    torch.testing.assert_close(c.token_ids.to(ids), ids[:, count:] if ids.dim() == 3 else ids[count:])
    assert sorted(set(c.token_ids[..., 0].flatten().tolist())) == [10.0, 20.0]


def test_fill_conditioning_is_what_the_pipeline_feeds(tiny_model, files) -> None:
    pipe, spec = load_pipeline(tiny_model("flux1-fill"))
    image, mask = Image.open(files["small"]).convert("RGB"), Image.open(files["mask"]).convert("L")
    seen = first_transformer_call(pipe, image=image, mask_image=mask)
    bb = B.Backbone(spec, pipe)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the pipeline first samples the image's own latent, then the initial noise
        torch.randn((1, 16, 4, 4), generator=g)
    with torch.no_grad():
        c = prepare_fill_conditioning(to_tensor(image)[None], (to_tensor(mask)[None] > 0), bb, "cpu", torch.float32, g)
    torch.testing.assert_close(B.pack(bb, c.channels), seen["kwargs"]["hidden_states"][..., 64:])


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model, files, tmp_path) -> None:
    kontext, fill = str(tiny_model("flux1-kontext")), str(tiny_model("flux1-fill"))
    small, mask = str(files["small"]), str(files["mask"])
    cases = {
        "the mask is 48x32": ["inpaint", "--model", fill, "--image", small, "--mask", str(files["wide"])],
        "the mask is empty": ["inpaint", "--model", fill, "--image", small, "--mask", str(files["empty"])],
        "takes at most 1 reference": ["edit", "--model", kontext, "--image", small, "--image", small],
        "which does not inpaint": ["inpaint", "--model", kontext, "--image", small, "--mask", mask],
        "which does not edit": ["edit", "--model", fill, "--image", small],
        "at least 64px": ["edit", "--model", str(tiny_model("flux2-klein")), "--image", small],
    }
    for expected, argv in cases.items():
        out = tmp_path / "never.png"
        code, _, err = run_cli(*argv, "--prompt", "x", "--steps", "1", "--out", str(out))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (expected, err)
        assert not out.exists()
