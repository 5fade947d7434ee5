"""DreamO on tiny FLUX.1 models: the official condition layout, files and fusion, the routing and placeholder
losses, the staged sampler and the `customize` command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.errors import UserError
from diffbase.methods.dreamo.mechanism.conditions import (
    DreamOEmbeddings,
    add_placeholder_tokens,
    added_after_x_embedder,
    pack_references,
    reference_ids,
)
from diffbase.methods.dreamo.mechanism.files import read_dreamo_file, write_dreamo_file
from diffbase.methods.dreamo.mechanism.generate import DreamOSettings, Reference, dreamo_generate
from diffbase.models.backbone import text_length
from diffbase.models.loading import load_pipeline
from tests.golden_record import assert_pixels_close
from tests.helpers import dreamo_embeddings, peft_lora, run_cli, write_dreamo_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dreamo"


def test_without_references_and_embeddings_it_is_flux_pipeline(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    pipe.set_progress_bar_config(disable=True)
    emb = DreamOEmbeddings.for_pipe(pipe)
    for p in emb.parameters():
        torch.nn.init.zeros_(p)
    s = DreamOSettings(prompt="a red shirt", height=64, width=48, steps=3, guidance=3.5, seed=3)
    ours = np.asarray(dreamo_generate(pipe, emb, [], s))
    theirs = pipe(prompt=s.prompt, height=64, width=48, num_inference_steps=3, guidance_scale=3.5,
                  generator=torch.Generator("cpu").manual_seed(3), **text_length(pipe, "flux1")).images[0]  # fmt: skip
    assert_pixels_close(ours, theirs)
    with_ref = dreamo_generate(pipe, emb, [Reference(Image.new("RGB", (32, 48), (200, 10, 10)), "ip", 1)], s)
    assert not np.array_equal(ours, np.asarray(with_ref))  # the reference changes the result


def test_diagonal_ids_in_packed_units_and_index_embeddings_with_an_empty_slot() -> None:
    ids = reference_ids((4, 4), [(2, 3), (2, 2)])  # a 64x64 target, references of 32x48 and 32x32 pixels
    assert ids[0][:, 0].eq(0).all() and ids[0][:, 1].unique().tolist() == [4, 5]
    assert ids[0][:, 2].unique().tolist() == [4, 5, 6]
    assert ids[1][:, 1].unique().tolist() == [6, 7] and ids[1][:, 2].unique().tolist() == [7, 8]
    emb = DreamOEmbeddings(width=8, t5_width=4)
    seq = emb.sequence(16, [(6, 1), (4, 3)], torch.float32)[0]  # slot 2 empty: the second reference is idx[3]
    assert torch.equal(seq[:16], emb.task.weight[1].expand(16, -1))
    assert torch.equal(seq[16:22], (emb.task.weight[0] + emb.idx.weight[1]).expand(6, -1))
    assert torch.equal(seq[22:], (emb.task.weight[0] + emb.idx.weight[3]).expand(4, -1))


def official_forward(t, hidden, added, **kw):
    """The official forward, step by step: x_embedder, + embeddings, time/text embedders, RoPE over
    [text ids, image ids], the blocks, the output layers (diffusers 0.42's single blocks take the text
    and image streams apart and join them inside, where the official forward joined them before)."""
    x = t.x_embedder(hidden) + added
    temb = t.time_text_embed(kw["timestep"] * 1000, kw["guidance"] * 1000, kw["pooled_projections"])
    e = t.context_embedder(kw["encoder_hidden_states"])
    rope = t.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    for block in t.transformer_blocks:
        e, x = block(hidden_states=x, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    for block in t.single_transformer_blocks:
        e, x = block(hidden_states=x, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    return t.proj_out(t.norm_out(x, temb))


def test_reference_tokens_through_the_transformer_as_the_official_forward(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    t, g = pipe.transformer, torch.Generator().manual_seed(0)
    emb = dreamo_embeddings(pipe)
    latents = pipe._pack_latents(torch.randn(1, 16, 8, 8, generator=g), 1, 16, 8, 8)
    ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    refs = [torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 4, 4, generator=g)]
    tokens = pack_references(pipe, refs, [1, 2], (4, 4))
    added = emb.sequence(16, list(zip(tokens.counts, tokens.indices, strict=True)), torch.float32)
    kw = {
        "encoder_hidden_states": torch.randn(1, 8, t.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.7]), "guidance": torch.tensor([3.5]), "txt_ids": torch.zeros(8, 3),
        "img_ids": torch.cat([ids, tokens.ids]),
    }  # fmt: skip
    hidden = torch.cat([latents, tokens.tokens], dim=1)
    with torch.no_grad(), added_after_x_embedder(t, added):
        ours = t(hidden_states=hidden, return_dict=False, **kw)[0][:, :16]
    with torch.no_grad():
        expected = official_forward(t, hidden, added, **kw)[:, :16]
        plain = t(hidden_states=hidden, return_dict=False, **kw)[0][:, :16]  # the hook is gone again
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, ours)


def delta(state: dict, scales: dict, path: str) -> torch.Tensor:
    a, b = state[f"transformer.{path}.lora_A.weight"], state[f"transformer.{path}.lora_B.weight"]
    return scales[f"transformer.{path}"] * b @ a


def test_official_file_loads_with_no_missing_or_unused_keys_and_fuses_as_the_official_code(
    tiny_model, tmp_path
) -> None:
    from diffbase.methods.dreamo.mechanism.files import fuse_dreamo

    pipe, _ = load_pipeline(tiny_model("flux1"))
    state, scales = peft_lora(pipe)
    emb = dreamo_embeddings(pipe)
    tensors = {"t5": emb.t5.weight.detach(), "task": emb.task.weight.detach(), "idx": emb.idx.weight.detach()}
    path = write_dreamo_file(tmp_path / "dreamo.safetensors", state, scales, tensors)
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert (
        "double_blocks_0.processor.qkv_lora1.down.weight" in keys
        and "single_blocks_1.processor.proj_lora.up.weight" in keys
    )
    lora, read = read_dreamo_file(path, pipe.transformer)
    assert {k.rsplit(".lora_", 1)[0] for k in lora} == {k.rsplit(".lora_", 1)[0] for k in state}  # none missing
    for name in ("t5", "task", "idx"):
        assert torch.equal(read[name], tensors[name])
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    before = len(pipe.tokenizer_2)
    loaded = fuse_dreamo(pipe, tmp_path, "none")
    for path_ in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
                  "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.1.proj_out"):  # fmt: skip
        fused = pipe.transformer.get_submodule(path_).weight
        torch.testing.assert_close(fused, base[f"{path_}.weight"] + delta(state, scales, path_), rtol=1e-5, atol=1e-6)
    # the ten tokens take the ids after the tokenizer's length, their T5 rows the shipped ones
    ids = pipe.tokenizer_2.convert_tokens_to_ids(["[ref#1]", "[res]"])
    assert ids == [before, before + 9]
    tokens = pipe.tokenizer_2("[ref#2] and [ref#1]").input_ids
    assert tokens[0] == before + 1 and before in tokens
    rows = pipe.text_encoder_2.get_input_embeddings().weight[before : before + 10]
    assert torch.equal(rows, loaded["t5"].to(rows))
    assert add_placeholder_tokens(pipe.tokenizer_2, pipe.text_encoder_2, loaded["t5"]) == list(
        range(before, before + 10)
    )


def test_recipe_weights_sum_the_deltas(tiny_model, tmp_path) -> None:
    """v1.1: dreamo 1, cfg-distill 1, SFT 1, DPO 1.25 (SFT and DPO in diffusers' own layout)."""
    from safetensors.torch import save_file

    from diffbase.methods.dreamo.mechanism.files import fuse_dreamo

    pipe, _ = load_pipeline(tiny_model("flux1"))
    emb = dreamo_embeddings(pipe)
    tensors = {"t5": emb.t5.weight.detach(), "task": emb.task.weight.detach(), "idx": emb.idx.weight.detach()}
    loras = [peft_lora(pipe, seed) for seed in range(4)]
    write_dreamo_file(tmp_path / "dreamo.safetensors", *loras[0], tensors)
    write_dreamo_file(tmp_path / "dreamo_cfg_distill.safetensors", *loras[1], tensors)
    (tmp_path / "v1.1").mkdir()
    for (state, scales), name in zip(loras[2:], ("sft", "dpo"), strict=True):  # scales baked in, no alpha
        baked = {k: v * (scales[k.rsplit(".lora_", 1)[0]] if ".lora_B." in k else 1) for k, v in state.items()}
        save_file(
            {k: v.contiguous() for k, v in baked.items()}, str(tmp_path / "v1.1" / f"dreamo_{name}_lora.safetensors")
        )
    path = "transformer_blocks.0.attn.to_q"
    base = pipe.transformer.get_submodule(path).weight.detach().clone()
    fuse_dreamo(pipe, tmp_path, "v1.1")
    expected = base + sum(w * delta(s, c, path) for (s, c), w in zip(loras, (1.0, 1.0, 1.0, 1.25), strict=True))
    torch.testing.assert_close(pipe.transformer.get_submodule(path).weight, expected, rtol=1e-5, atol=1e-6)


def test_bad_dreamo_files_are_one_line_errors(tiny_model, tmp_path) -> None:
    from safetensors.torch import save_file

    pipe, _ = load_pipeline(tiny_model("flux1"))
    save_file({"double_blocks_0.processor.qkv_lora1.down.weight": torch.zeros(2, 32)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(UserError, match="missing dreamo_t5_embedding.weight"):
        read_dreamo_file(tmp_path / "a.safetensors", pipe.transformer)
    state, scales = peft_lora(pipe)
    emb = dreamo_embeddings(pipe)
    tensors = {"t5": emb.t5.weight.detach(), "task": emb.task.weight.detach()[:, :8], "idx": emb.idx.weight.detach()}
    write_dreamo_file(tmp_path / "b.safetensors", state, scales, tensors)
    with pytest.raises(UserError, match=r"condition embeddings of shape \(2, 8\)"):
        read_dreamo_file(tmp_path / "b.safetensors", pipe.transformer)
    with pytest.raises(UserError, match="no such file"):
        read_dreamo_file(tmp_path / "missing.safetensors", pipe.transformer)


def test_probe_processor_computes_the_stock_attention(tiny_model) -> None:
    from diffbase.methods.dreamo.mechanism.processor import install_probes
    from diffbase.methods.dreamo.mechanism.routing import Layout

    pipe, _ = load_pipeline(tiny_model("flux1"))
    stock, probed = pipe.transformer, copy.deepcopy(pipe.transformer)
    probes = install_probes(probed, ["transformer_blocks.0", "single_transformer_blocks.1"])
    g = torch.Generator().manual_seed(1)
    kw = {
        "hidden_states": torch.randn(1, 24, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]), "txt_ids": torch.zeros(8, 3), "img_ids": torch.rand(24, 3) * 4,
        "return_dict": False,
    }  # fmt: skip
    probes.layout, probes.collecting = Layout(8, 16, [4, 4], [[(2, 0), (5, 1)]]), True
    torch.testing.assert_close(probed(**kw)[0], stock(**kw)[0], rtol=1e-5, atol=1e-6)
    assert len(probes.route) == 2 and probes.route[0].shape == (1, 2, 16)
    torch.testing.assert_close(probes.route[0].sum(-1), torch.ones(1, 2))  # a distribution over the target
    assert probes.holder[0][0].shape == (2, 2)


def steered(n_refs: int, noisy: int, mask: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k over [text 2, noisy, references 2 tokens each] where every reference query points at the noisy
    keys inside `mask` and placeholder text token i at reference i's keys (strength 0: all keys equal)."""
    d, refs = 4, 2 * n_refs
    q = torch.zeros(1, 2 + noisy + refs, 1, d)
    k = torch.zeros_like(q)
    q[0, 2 + noisy :, 0, 0] = 1.0
    k[0, 2 : 2 + noisy, 0, 0] = strength * (2 * mask.float() - 1)
    for i in range(n_refs):
        q[0, i, 0, 1 + i] = 1.0
        k[0, 2 + noisy + 2 * i : 2 + noisy + 2 * i + 2, 0, 1 + i] = strength
    return q, k


def test_routing_and_placeholder_losses_are_zero_when_attention_matches_and_positive_otherwise() -> None:
    from diffbase.methods.dreamo.mechanism.routing import Layout, Probes, holder_loss, record, route_loss

    mask = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0])
    masks = torch.stack([mask, mask])[None]
    for strength, zero in ((200.0, True), (0.0, False)):
        probes = Probes(collecting=True, layout=Layout(2, 8, [2, 2], [[(0, 0), (1, 1)]]))
        record(probes, *steered(2, 8, mask, strength))
        r, h = route_loss(probes, masks, torch.ones(1, 2, dtype=torch.bool)), holder_loss(probes)
        assert (float(r) < 1e-8 and float(h) < 1e-8) if zero else (float(r) > 0.1 and float(h) > 0.1)
    probes = Probes(collecting=True, layout=Layout(2, 8, [2, 2], [[(0, 1), (1, 0)]]))  # placeholders swapped
    record(probes, *steered(2, 8, mask, 200.0))
    assert float(holder_loss(probes)) > 0.4


def tiny_config(tmp_path: Path, *overrides: str):
    from diffbase.config import configs_dir, load_config

    return load_config(configs_dir() / "experiments" / "tiny" / "flux1_dreamo.yaml", [
        f"data.train_path={EXAMPLES / 'metadata.jsonl'}", f"experiment.output_dir={tmp_path}", *overrides])  # fmt: skip


@pytest.mark.parametrize("term", ["loss_route", "loss_holder"])
def test_each_attention_loss_alone_reaches_the_lora_and_the_condition_embeddings(term: str, tmp_path) -> None:
    from diffbase.methods.dreamo.method import dataset, loss, prepare
    from diffbase.training.train import load_backbone

    other = "lambda_holder" if term == "loss_route" else "lambda_route"
    config = tiny_config(tmp_path, "training.dreamo.plain_text_probability=0.0", "training.dreamo.lambda_diff=0",
                         f"training.dreamo.{other}=0")  # fmt: skip
    bb = load_backbone(config)
    data = dataset(config, False, bb)
    trained = prepare(bb, config)
    with torch.no_grad():  # LoRA B starts at zero; give it a value so the A side gets gradients too
        for name, p in bb.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    total, terms = loss(config, bb, trained, data.collate([data[0], data[1]]), None, 0)
    assert set(terms) == {"loss_diff", term} and float(terms[term]) > 0
    total.backward()
    lora = [p.grad for n, p in bb.denoiser.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora and any(float(g.abs().sum()) > 0 for g in lora)
    emb = trained.modules["dreamo"]
    assert float(emb.idx.weight.grad[1:3].abs().sum()) > 0 and float(emb.task.weight.grad[0].abs().sum()) > 0
    assert emb.idx.weight.grad[3:].abs().sum() == 0  # only the two references' rows


def test_stages_follow_their_mix_and_must_add_up_to_max_steps(tmp_path) -> None:
    from diffbase.methods.dreamo.method import dataset
    from diffbase.training.train import load_backbone

    data_path = EXAMPLES / "metadata.jsonl"
    stages = "training.dreamo.stages=[{name: a, steps: 4, mix: [1, 0]}, {name: b, steps: 6, mix: [0, 1]}]"
    config = tiny_config(tmp_path, f"data.datasets=[{{path: {data_path}}}, {{path: {data_path}}}]",
                         "data.train_path=null", stages, "training.max_steps=10", "training.validation.loss_split=0")  # fmt: skip
    bb = load_backbone(config)
    data = dataset(config, False, bb)
    batches = list(data.sampler(2))
    assert len(batches) == 10
    sets = [{data.records[i].dataset for i in b} for b in batches]
    assert all(s == {0} for s in sets[:4]) and all(s == {1} for s in sets[4:])
    bad = tiny_config(tmp_path, stages, "training.max_steps=20")
    with pytest.raises(UserError, match="add up to 10; training.max_steps is 20"):
        dataset(bad, False, bb)


def test_cached_run_equals_uncached_and_no_encoder_runs_in_a_step(tmp_path, monkeypatch) -> None:
    """data.cache_latents and cache_text: the targets' and references' latents and the prompts (with and without
    placeholders) come from the cache, so a step reads no pixels and calls neither the VAE nor a text encoder,
    and the losses equal the uncached run's (rel 1e-6; measured equal to the bit on this CPU)."""
    from diffbase.methods import train
    from diffbase.methods.dreamo import method as dreamo
    from diffbase.models import backbone as B

    calls: list[str] = []

    def counted(name: str):  # noqa: ANN202
        original = getattr(B, name)

        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for name in ("encode_images", "encode_distribution", "encode_prompts"):
        monkeypatch.setattr(B, name, counted(name))
    steps: list[tuple[int, bool]] = []  # per training step: encoder calls, whether the batch had pixels
    predict = dreamo.predict

    def spied(config, bb, trained, batch, cache, *rest, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        before = len(calls)
        out = predict(config, bb, trained, batch, cache, *rest, **kwargs)
        if "plain_text" not in kwargs:  # the loss's call (held-out validation passes plain_text=0)
            steps.append((len(calls) - before, "pixels" in batch))
        return out

    monkeypatch.setattr(dreamo, "predict", spied)
    common = ("training.max_steps=4", "training.checkpoint_every=0")
    plain = train(tiny_config(tmp_path / "plain", *common), show_progress=False)
    assert len(steps) == 4 and all(n > 0 and pixels for n, pixels in steps)  # the spy sees the step's encoding
    steps.clear()
    cached = train(tiny_config(tmp_path / "cached", *common, "data.cache_latents=true", "data.cache_text=true"),
                   show_progress=False)  # fmt: skip
    assert steps == [(0, False)] * 4
    assert cached.losses == pytest.approx(plain.losses, rel=1e-6)


def test_customize_command_writes_the_image_and_refuses_bad_input(tiny_model, tmp_path) -> None:
    model = tiny_model("flux1")
    pipe, _ = load_pipeline(model)
    folder = tmp_path / "dreamo"
    folder.mkdir()
    write_dreamo_folder(pipe, folder)
    ref1, ref2 = EXAMPLES / "references" / "00000_1.png", EXAMPLES / "references" / "00000_2.png"
    out = tmp_path / "r.png"
    common = ["customize", "--model", str(model), "--dreamo", str(folder), "--version", "none",
              "--prompt", "[ref#1] and [ref#2]", "--size", "32x48", "--steps", "2", "--ref-res", "32"]  # fmt: skip
    code, stdout, err = run_cli(*common, "--ref", f"{ref1}:ip", "--ref", f"{ref2}:style", "--out", str(out),
                                "--grid", str(tmp_path / "g.png"))  # fmt: skip
    assert code == 0, err
    assert Image.open(out).size == (48, 32) and (tmp_path / "g.png").exists()
    code, _, err = run_cli(*common, "--ref", "none", "--ref", f"{ref2}:tryon", "--dtype", "bfloat16",
                           "--out", str(tmp_path / "bf16.png"))  # fmt: skip
    assert code == 0 and np.asarray(Image.open(tmp_path / "bf16.png")).std() > 0, err  # as users run it
    bad = {
        ("--ref", f"{ref1}:face"): "expected IMAGE:TASK",
        ("--ref", f"{tmp_path}/nothing.png:ip"): "nothing.png",
        ("--ref", f"{ref1}:ip", "--ref-mask", "2=x.png"): "slot 2 has no --ref",
        tuple(x for _ in range(10) for x in ("--ref", f"{ref1}:ip")): "at most 9",
    }
    for args, message in bad.items():
        target = tmp_path / "bad.png"
        code, _, err = run_cli(*common, *args, "--out", str(target))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not target.exists(), err
    code, _, err = run_cli(
        *common[:4], str(tmp_path), *common[5:], "--ref", f"{ref1}:ip", "--out", str(tmp_path / "x.png")
    )
    assert code == 2 and "dreamo.safetensors: no such file" in err


def test_synthetic_two_reference_data_places_each_garment_where_the_caption_says() -> None:
    entries = [json.loads(x) for x in (EXAMPLES / "metadata.jsonl").read_text().splitlines()]
    for e in entries[:4]:
        target = np.asarray(Image.open(EXAMPLES / e["image"]).convert("RGB"), dtype=float)
        left = int(e["caption"].split("]")[0].removeprefix("[ref#")) - 1
        ref = np.asarray(Image.open(EXAMPLES / e["references"][left]["image"]).convert("RGB"), dtype=float)
        assert np.abs(target[:, : ref.shape[1]] - ref).mean() < 1.0
        mask = np.asarray(Image.open(EXAMPLES / e["references"][left]["mask"]))
        assert mask[:, : ref.shape[1]].any() and not mask[:, ref.shape[1] :].any()


def test_cached_reference_mode_is_close_to_exact_and_equal_with_one_step(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("flux1"))
    emb = dreamo_embeddings(pipe)
    refs = [Reference(Image.open(EXAMPLES / "references" / "00000_1.png"), "ip", 1),
            Reference(Image.open(EXAMPLES / "references" / "00000_2.png"), "ip", 2)]  # fmt: skip
    processors = dict(pipe.transformer.attn_processors)
    results = {}
    for steps in (1, 4):
        for cached in (False, True):
            s = DreamOSettings(
                prompt="[ref#1] and [ref#2]", height=32, width=64, steps=steps, seed=1, cache_references=cached
            )
            results[steps, cached] = np.asarray(dreamo_generate(pipe, emb, refs, s), dtype=float)
    assert np.array_equal(results[1, False], results[1, True])  # one step: the recording call is the exact one
    diff = np.abs(results[4, False] - results[4, True])
    assert 0 < diff.mean() < 10  # later steps read the first step's keys and values: close, not equal
    assert dict(pipe.transformer.attn_processors).keys() == processors.keys()
    assert all(type(p) is type(processors[n]) for n, p in pipe.transformer.attn_processors.items())  # restored


def test_bad_dreamo_metadata_is_a_one_line_error(tmp_path) -> None:
    from diffbase.methods.dreamo.mechanism.data import read_items

    cases = {
        '{"image": "t.png", "caption": "x"}': "a 'references' list",
        '{"image": "t.png", "references": [{"task": "ip"}]}': "each reference needs 'image'",
        '{"image": "t.png", "references": [{"image": "a.png", "task": "pose"}]}': "each reference needs 'image'",
        '{"image": "t.png", "references": []}': "0 references; DreamO takes 1 to 9",
    }
    for line, message in cases.items():
        (tmp_path / "metadata.jsonl").write_text(line + "\n")
        with pytest.raises(UserError, match=message):
            read_items(tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        read_items(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metadata.jsonl"):
        read_items(tmp_path / "empty")
