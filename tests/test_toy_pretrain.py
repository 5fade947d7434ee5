"""`diffbase zoo pretrain`: the toy SD1.5's stages, and continuing an earlier result (`--from`)."""

from __future__ import annotations

import json

import torch

from diffbase.toy.pretrain import hue_rotate, pretrain


def test_hue_rotation_keeps_greys_and_lightness_structure() -> None:
    g = torch.Generator().manual_seed(0)
    grey = torch.full((2, 3, 4, 4), 0.2)
    torch.testing.assert_close(hue_rotate(grey, g), grey, atol=1e-6, rtol=0)
    red = torch.tensor([0.2, -0.2, -0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert not torch.allclose(hue_rotate(red, g), red)  # the colour moves, the sum of channels stays
    torch.testing.assert_close(hue_rotate(red, g).sum(1), red.sum(1), atol=1e-5, rtol=0)


def test_continuing_trains_the_decoder_and_unet_and_keeps_the_encoder(tmp_path) -> None:
    from diffbase.models.loading import load_pipeline

    first = pretrain("sd15-toy", tmp_path / "a", vae_steps=2, unet_steps=2, pool_size=16, show=False)
    second = pretrain("sd15-toy", tmp_path / "b", vae_steps=0, unet_steps=2, pool_size=16, show=False,
                      decoder_steps=2, start=first)  # fmt: skip
    a, _ = load_pipeline(first)
    b, _ = load_pipeline(second)
    sa, sb = a.vae.state_dict(), b.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("encoder.", "quant_conv")))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    assert any(not torch.equal(v, b.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())
    record = json.loads((second / "pretrain.json").read_text())
    assert "--from" in record["command"] and record["history"][0]["command"].startswith("diffbase zoo pretrain")
    assert "_name_or_path" not in (second / "vae" / "config.json").read_text()
