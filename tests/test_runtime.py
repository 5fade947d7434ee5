"""The device policy, the attention choice, gradient checkpointing `auto` and `diffbase doctor`.

The CPU has no accelerator, so placement is checked with the meta device standing in for one:
modules really move there (their tensors lose their data), which is what the policy decides."""

from __future__ import annotations

import pytest
import torch

from diffbase.errors import UserError
from diffbase.models.backbone import Backbone
from diffbase.models.loading import load_pipeline
from diffbase.models.placement import (
    component_devices,
    cpu_state,
    encoders_on,
    place_for_training,
    place_pipeline,
    resolve_device,
)
from tests.helpers import run_cli


def backbone(tiny_model, family: str = "flux1") -> Backbone:
    pipe, spec = load_pipeline(tiny_model(family))
    return Backbone(spec, pipe)


def test_device_names() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device: expected auto, cpu"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="hardware.device: cuda requested but torch .* sees no CUDA device"):
            resolve_device("cuda", "hardware.device")


def test_training_placement_puts_everything_on_the_device_or_parks_encoders(tiny_model) -> None:
    bb = backbone(tiny_model)
    place_for_training(bb, "meta")
    devices = component_devices(bb.pipe)
    assert set(devices) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert set(devices.values()) == {"meta"}  # caching and uncached encoding then run on the device

    bb = backbone(tiny_model)
    place_for_training(bb, "meta", offload="model")
    devices = component_devices(bb.pipe)
    assert devices.pop("transformer") == "meta" and set(devices.values()) == {"cpu"}
    moves: dict[str, list[str]] = {}
    for name in devices:  # record the moves (a module on meta cannot come back to the CPU with its data)
        module = getattr(bb.pipe, name)
        module.to = lambda device, name=name, module=module: moves.setdefault(name, []).append(str(device)) or module
    with encoders_on(bb):  # while encoding, decoding or validating: on the denoiser's device
        assert all(m == ["meta"] for m in moves.values())
    assert moves == {name: ["meta", "cpu"] for name in devices}  # and parked again afterwards
    with pytest.raises(UserError, match="hardware.offload: expected one of none, model"):
        place_for_training(bb, "cpu", offload="sequential")


def test_inference_placement(tiny_model) -> None:
    pipe, _ = load_pipeline(tiny_model("sd15"), device="meta")
    assert set(component_devices(pipe).values()) == {"meta"}
    with pytest.raises(UserError, match="--offload model: .* the device is cpu"):
        place_pipeline(pipe, "cpu", "model")
    with pytest.raises(UserError, match="--offload: expected one of"):
        place_pipeline(pipe, "cpu", "layers")


def test_kohya_export_stays_on_the_weights_device() -> None:
    """The FLUX.1 kohya conversion builds fused zero blocks; they must be made where the weights are
    (it once mixed CPU zeros with CUDA weights and the LoRA was never written)."""
    from diffbase.models.lora_formats import to_kohya

    rank, width = 2, 8
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(rank, width, device="meta"),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(width, rank, device="meta"),
    }
    dims = {f"transformer.transformer_blocks.0.attn.to_{x}": width for x in "qkv"}
    out = to_kohya(state, {k.rsplit(".", 2)[0]: 1.0 for k in state}, "flux1", dims)
    up = out["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.device.type == "meta" and up.shape == (3 * width, 3 * rank)
    assert all(t.device.type == "cpu" for t in cpu_state({"a": torch.ones(2)}).values())


def test_attention_choices() -> None:
    from diffbase.attention import choose

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = choose("auto", cuda)
    assert "cudnn" not in auto.kernels and "flash" in auto.kernels  # the kernel that broke FLUX training
    assert choose("auto", cpu).kernels == ("flash", "efficient", "cudnn", "math")  # PyTorch's defaults
    assert choose("math", cuda).kernels == ("math",)
    assert choose("sage", cuda).diffusers_backend == "sage"
    assert choose("flash_attn", cuda).diffusers_backend == "flash"  # the flash-attn package
    with pytest.raises(UserError, match="unknown attention backend 'flsh' \\(did you mean 'flash'"):
        choose("flsh", cpu)
    with pytest.raises(UserError, match="downloads its kernel"):
        choose("flash_hub", cpu)


def test_a_diffusers_backend_is_set_on_the_denoiser_and_gives_the_same_output(tiny_model) -> None:
    from diffbase.attention import apply_attention, backends_in_use, choose
    from tests.helpers import transformer_inputs as inputs

    transformer = backbone(tiny_model, "flux1").denoiser
    kwargs = inputs(transformer, seed=0)
    cpu = torch.device("cpu")
    with torch.no_grad():
        before = transformer(**kwargs)[0]
        apply_attention(choose("_native_math", cpu), [transformer])
        after = transformer(**kwargs)[0]
    assert backends_in_use(transformer) == {"_native_math"}
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    apply_attention(choose("native", cpu), [transformer])
    # SD3's processors have no backend switch: diffusers would skip them silently, diffbase says so
    with pytest.raises(UserError, match="SD3Transformer2DModel's attention processors do not take"):
        apply_attention(choose("_native_math", cpu), [backbone(tiny_model, "sd3").denoiser])
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # process-wide in diffusers


def test_checkpointing_auto_decision() -> None:
    from diffbase.training.memory import needs_checkpointing, probe_needs_checkpointing

    gib = 2**30
    assert needs_checkpointing(oom=True, peak_bytes=0, total_bytes=80 * gib)
    assert needs_checkpointing(oom=False, peak_bytes=79 * gib, total_bytes=80 * gib)
    assert not needs_checkpointing(oom=False, peak_bytes=56 * gib, total_bytes=141 * gib)  # FLUX.1 LoRA on an H200
    ran = []
    on, why = probe_needs_checkpointing(lambda: ran.append(1), torch.device("cpu"))
    assert not on and not ran and "CPU" in why


def test_training_with_offload_auto_checkpointing_and_an_attention_choice(tmp_path) -> None:
    """Encoders parked on the CPU between uses, cached prompts and latents, validation images: the run
    trains, validates and exports; checkpointing `auto` stays off on a CPU and says why."""
    from pathlib import Path

    shapes = Path(__file__).resolve().parents[1] / "examples" / "shapes"
    code, out, err = run_cli(
        "train",
        "configs/experiments/tiny/flux1_lora.yaml",
        "training.max_steps=2",
        "training.checkpoint_every=0",
        "training.validation.steps=2",
        f"data.train_path={shapes}",
        f"experiment.output_dir={tmp_path}",
        "data.cache_latents=true",
        "data.cache_text=true",
        "hardware.offload=model",
        "hardware.gradient_checkpointing=auto",
        "--attention",
        "math",
        "--dtype",
        "bfloat16",
    )
    assert code == 0, err
    assert "gradient checkpointing: off (no accelerator memory to save on a CPU)" in out
    assert (tmp_path / "validation" / "step-000002.png").exists()
    assert (tmp_path / "lora" / "lora_kohya.safetensors").exists()
    assert "mixed_precision: bf16" in (tmp_path / "config.yaml").read_text()


def test_doctor_runs_on_a_cpu_and_says_so() -> None:
    code, out, err = run_cli("doctor")
    assert code == 0, err
    assert "device: cpu (no CUDA device" in out
    assert "  math       ok" in out
    assert "hardware.attention_backend auto uses" in out
    code, _, err = run_cli("doctor", "--device", "cuda:7")
    assert code == 2 and err.startswith("error: --device: cuda:7 requested")


def test_a_batch_is_on_the_compute_device_before_the_loss(tiny_model) -> None:
    """Masks and control images reach the loss on the denoiser's device (on a GPU, a CPU control image
    escaped CUDA autocast and every ControlNet run failed at its first step)."""
    from diffbase.training.loop import encode_batch

    bb = backbone(tiny_model, "sd15")
    bb.denoiser.to("meta")

    class Cached:  # posterior and text already computed, as a cache gives them
        def lookup(self, batch):
            return torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), {"prompt_embeds": torch.zeros(1, 3, 8)}

    batch = {"index": [0], "mask": torch.ones(1, 1, 16, 16), "control": torch.zeros(1, 3, 16, 16), "size": (16, 16)}
    encoded, _ = encode_batch(bb, batch, Cached(), keep=("mask", "control"))
    assert {encoded[k].device.type for k in ("mean", "std", "mask", "control")} == {"meta"}


def test_auto_undoes_an_earlier_kernel_choice_in_the_same_process() -> None:
    """The SDPA switches are process-wide and steer CPU attention too: a run with `math` once left later
    runs in the same process (tests, notebooks) on another kernel than a fresh process would use."""
    from diffbase.attention import apply_attention, choose

    cpu = torch.device("cpu")
    apply_attention(choose("math", cpu), [])
    assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    apply_attention(choose("auto", cpu), [])
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
