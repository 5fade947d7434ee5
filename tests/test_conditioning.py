"""The backbone's conditioning seam: reference tokens, extra channels and their ids, checked against
what diffusers' FluxKontextPipeline and FluxFillPipeline feed their transformers; and the spec rows
that let Kontext, Fill and klein inpainting folders load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from diffbase.models import backbone as B
from diffbase.models.loading import load_pipeline
from diffbase.models.zoo import write_tiny
from tests.helpers import first_transformer_call

ROWS = {
    "flux1-kontext": "FluxKontextPipeline",
    "flux1-fill": "FluxFillPipeline",
    "flux2-klein-inpaint": "Flux2KleinInpaintPipeline",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rows")
    return {name: write_tiny(name, root / name) for name in ROWS}


def test_editing_and_inpainting_folders_load(folders: dict[str, Path]) -> None:
    for name, pipeline in ROWS.items():
        pipe, spec = load_pipeline(folders[name])
        assert type(pipe).__name__ == pipeline and spec.name == name
    assert load_pipeline(folders["flux1-fill"])[0].transformer.config.in_channels == 384


def cond_of(kwargs: dict) -> dict:
    return {
        "prompt_embeds": kwargs["encoder_hidden_states"],
        "pooled_prompt_embeds": kwargs["pooled_projections"],
        "text_ids": kwargs["txt_ids"],
    }


def test_kontext_reference_tokens_are_what_the_pipeline_feeds(folders: dict[str, Path]) -> None:
    pipe, spec = load_pipeline(folders["flux1-kontext"])
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    seen = first_transformer_call(pipe, image=image, _auto_resize=False, max_area=32 * 32)
    kw = seen["kwargs"]
    bb = B.Backbone(spec, pipe)
    latents_hw = (4, 4)  # 32 px / 8, packed 2x2 -> 4 tokens
    count = 4
    noisy = B.unpack(bb, kw["hidden_states"][:, :count], latents_hw)
    ref_tokens = kw["hidden_states"][:, count:]
    side = int(ref_tokens.shape[1] ** 0.5) * 2
    reference = B.unpack(bb, ref_tokens, (side, side))
    ids = B.reference_ids(bb, reference)
    torch.testing.assert_close(ids, kw["img_ids"][count:])  # t = 1, the grid from (0, 0)
    torch.testing.assert_close(B.pack(bb, reference), ref_tokens)
    with torch.no_grad():
        out = B.denoise(
            bb, noisy, kw["timestep"] * 1000, cond_of(kw), guidance=float(kw["guidance"][0]),
            conditioning=B.Conditioning(tokens=B.pack(bb, reference), token_ids=ids),
        )  # fmt: skip
        plain = B.denoise(bb, noisy, kw["timestep"] * 1000, cond_of(kw), guidance=float(kw["guidance"][0]))
    torch.testing.assert_close(out, B.unpack(bb, seen["out"][:, :count], latents_hw))
    assert not torch.allclose(out, plain)  # the reference reaches the target tokens


def test_fill_channels_are_what_the_pipeline_feeds(folders: dict[str, Path]) -> None:
    pipe, spec = load_pipeline(folders["flux1-fill"])
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    seen = first_transformer_call(pipe, image=Image.new("RGB", (32, 32), (30, 90, 200)), mask_image=mask)
    kw = seen["kwargs"]
    bb = B.Backbone(spec, pipe)
    hidden, latents_hw = kw["hidden_states"], (4, 4)
    noisy = B.unpack(bb, hidden[..., :64], latents_hw)
    channels = B.unpack(bb, hidden[..., 64:], latents_hw)  # masked latent (16) + mask unshuffled by 8 (64)
    assert channels.shape[1] == 80
    with torch.no_grad():
        out = B.denoise(bb, noisy, kw["timestep"] * 1000, cond_of(kw), guidance=float(kw["guidance"][0]),
                        conditioning=B.Conditioning(channels=channels))  # fmt: skip
    torch.testing.assert_close(out, B.unpack(bb, seen["out"], latents_hw))


def test_unet_channels_join_the_latents(tiny_model) -> None:
    """An inpainting-style UNet (more input channels) takes the extra channels after the latents."""
    from diffbase.methods.tryon.mechanism.vton import expand_conv_in

    pipe, spec = load_pipeline(tiny_model("sd15"))
    bb = B.Backbone(spec, pipe)
    expand_conv_in(pipe.unet, "catvton")  # 9 input channels: 4 + 5 extra
    latents, extra = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8)
    cond = {"prompt_embeds": torch.randn(1, 7, pipe.unet.config.cross_attention_dim)}
    t = torch.tensor([500])
    with torch.no_grad():
        out = B.denoise(bb, latents, t, cond, conditioning=B.Conditioning(channels=extra))
        direct = pipe.unet(torch.cat([latents, extra], 1), t, encoder_hidden_states=cond["prompt_embeds"])[0]
    torch.testing.assert_close(out, direct)


def test_flux2_reference_ids_follow_the_pipeline(tiny_model) -> None:
    """Reference i sits at t = 10 + 10 i on its own grid (Flux2Pipeline's `_prepare_image_ids`)."""
    pipe, spec = load_pipeline(tiny_model("flux2-klein"))
    bb = B.Backbone(spec, pipe)
    latents = torch.zeros(1, 128, 2, 3)
    for index in (0, 1):
        ids = B.reference_ids(bb, latents, index)
        assert ids.shape[-2:] == (6, 4) and set(ids[..., 0].flatten().tolist()) == {10.0 + 10 * index}
        assert ids[..., 1:3].reshape(-1, 2).tolist() == [[h, w] for h in range(2) for w in range(3)]
