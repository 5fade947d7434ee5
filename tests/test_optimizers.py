"""Optimizers and schedules from the packages that maintain them, and the noise offset."""

from __future__ import annotations

import json

import pytest
import torch

from diffbase.config import load_config
from diffbase.errors import UserError
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli

FLUX_LORA = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")
ON_A_CPU = (
    "adamw",
    "lion",
    "prodigy",
    "adafactor",
    "adamw_schedulefree",
)  # the 8-bit ones are bitsandbytes' (CUDA): the GPU stage


@pytest.mark.parametrize("kind", ON_A_CPU)
def test_each_optimizer_trains_a_tiny_lora_in_bf16(kind, tmp_path) -> None:
    lr = "1.0" if kind == "prodigy" else "0.01"
    code, _, err = run_cli(
        "train", str(FLUX_LORA), "training.max_steps=3", "training.checkpoint_every=0", "training.validation.steps=2",
        f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}", f"training.optimizer.type={kind}",
        f"training.learning_rate={lr}", "--dtype", "bfloat16",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert len(norms) == 3 and all(torch.isfinite(torch.tensor(norms)))
    assert (tmp_path / "lora" / "lora_kohya.safetensors").exists()


def test_the_optimizer_is_the_packages_own_with_the_configs_settings(tmp_path) -> None:
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    from diffbase.training.optimizers import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    for kind, cls in (("lion", Lion), ("prodigy", Prodigy), ("adafactor", Adafactor), ("adamw", torch.optim.AdamW)):
        config = load_config(FLUX_LORA, [f"training.optimizer.type={kind}", "training.learning_rate=0.003",
                                         "training.optimizer.weight_decay=0.1"])  # fmt: skip
        opt = make_optimizer(params, config)
        assert type(opt) is cls and opt.defaults["lr"] == 0.003 and opt.defaults["weight_decay"] == 0.1


def test_a_missing_package_is_a_one_line_error(monkeypatch) -> None:
    import sys

    from diffbase.training.optimizers import optimizer_class

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an import finds when the package is absent
    with pytest.raises(
        UserError, match=r"training.optimizer.type: prodigy needs prodigyopt \(pip install prodigyopt\)"
    ):
        optimizer_class("prodigy")


@pytest.mark.parametrize("name", ["linear", "cosine_with_restarts", "polynomial", "constant_with_warmup"])
def test_diffusers_schedules_are_diffusers_own(name) -> None:
    from diffusers.optimization import get_scheduler

    from diffbase.config import ScheduleConfig
    from diffbase.training.schedule import make_scheduler

    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched, out = make(opt), []
        for _ in range(10):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cfg = ScheduleConfig(type=name, warmup_steps=2, num_cycles=2, power=2.0)
    ours = lrs(lambda o: make_scheduler(o, 10, 0.1, cfg))
    theirs = lrs(lambda o: get_scheduler(name, o, num_warmup_steps=2, num_training_steps=10, num_cycles=2, power=2.0))
    assert ours == theirs and len(set(ours)) > 1


def test_noise_offset_shifts_each_channel_by_one_draw_and_is_off_by_default(tiny_model) -> None:
    from dataclasses import replace

    from diffbase.config import ObjectiveConfig
    from diffbase.models.families.types import Backbone
    from diffbase.models.loading import load_pipeline
    from diffbase.training.step import draw

    pipe, spec = load_pipeline(tiny_model("sd15"))
    bb = Backbone(spec, pipe)
    mean, std = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    plain = draw(bb, ObjectiveConfig(), mean, std, 0, 1, [0, 1])[1]
    again = draw(bb, ObjectiveConfig(noise_offset=0.0), mean, std, 0, 1, [0, 1])[1]
    offset = draw(bb, replace(ObjectiveConfig(), noise_offset=0.5), mean, std, 0, 1, [0, 1])[1]
    assert torch.equal(plain, again)
    shift = offset - plain
    assert shift.abs().sum() > 0
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))  # constant over each channel's pixels


def test_schedule_free_adamw_exports_and_validates_its_averaged_weights(tmp_path) -> None:
    """Schedule-free AdamW steps one sequence of weights (y) and is evaluated on their average (x): the export is
    x, and the run keeps training on y between validations."""
    from safetensors.torch import load_file

    from diffbase.methods import train

    config = load_config(FLUX_LORA, ["training.max_steps=4", "training.checkpoint_every=0", "training.validation.every=2",
                                     "training.validation.steps=2", f"data.train_path={SHAPES}",
                                     f"experiment.output_dir={tmp_path}", "training.optimizer.type=adamw_schedulefree",
                                     "training.schedule.warmup_steps=2"])  # fmt: skip
    result = train(config, show_progress=False)
    optimizer = result.optimizer
    assert optimizer.param_groups[0]["train_mode"] is False  # switched to the average for the export
    exported = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    names = {id(p): "transformer." + n.replace(".default", "") for n, p in result.trained.modules["denoiser"]
             .named_parameters() if p.requires_grad}  # fmt: skip
    for p in result.trained.trainable:
        torch.testing.assert_close(exported[names[id(p)]], p.detach().cpu(), rtol=0, atol=0)  # x is exported
    x = [p.detach().clone() for p in result.trained.trainable]
    optimizer.train()  # back to the training sequence: y differs from x once the weights moved
    moved = sum(int(not torch.allclose(p.detach(), a)) for p, a in zip(result.trained.trainable, x, strict=True))
    assert moved > 0
    assert optimizer.param_groups[0]["warmup_steps"] == 2 and optimizer.param_groups[0]["lr"] == 0.01


def test_adamw_is_fused_where_torch_has_the_kernel_and_computes_what_the_multi_tensor_one_does() -> None:
    """`adamw` takes torch's fused kernel on the CPU (and CUDA) unless `optimizer.fused: false`; `true` on a device
    without one is a one-line error. Five steps of a tiny regression: the same losses as the multi-tensor AdamW to
    1e-6 relative (measured on this CPU: 1.6e-7, a few float32 ulps)."""
    from diffbase.training.optimizers import make_optimizer, skips_on_device

    def run(*overrides: str) -> tuple[list[float], torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        config = load_config(FLUX_LORA, ["training.learning_rate=0.01", *overrides])
        opt, out = make_optimizer(list(model.parameters()), config), []
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out, opt

    fused, opt = run()
    assert opt.defaults["fused"] is True and skips_on_device(opt)
    plain, opt = run("training.optimizer.fused=false")
    assert not opt.defaults["fused"] and not skips_on_device(opt)
    assert fused == pytest.approx(plain, rel=1e-6)
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    config = load_config(FLUX_LORA, ["training.optimizer.fused=true"])
    with pytest.raises(UserError, match=r"training.optimizer.fused: torch has no fused AdamW .*\['meta'\]"):
        make_optimizer(meta, config)
    assert not make_optimizer(meta, load_config(FLUX_LORA)).defaults["fused"]  # auto: torch's default there
