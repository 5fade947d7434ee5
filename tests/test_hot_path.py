"""The training step without host reads (issue 31): the loss, its terms and the grad norm stay on the device and are
read every `logging.read_every` steps, a non-finite loss is skipped on the device by the fused AdamW, and host
tensors go to the device pinned and queued on CUDA. What each test pins:

- reading every 4 steps writes the same metrics.jsonl as reading every step, bit for bit (the reads change when the
  host looks, not what is computed), and the fused AdamW (the default) the same losses as torch's multi-tensor
  AdamW with today's synchronous check (`training.optimizer.fused: false`) to LOSS_RTOL;
- an injected NaN loss: the fused AdamW leaves every trained weight as it was (bitwise), the step is counted as
  skipped, the row numbering and the schedule are what the host would have counted knowing at once;
- between two reads, the loop itself makes no host read: no Tensor.item / tolist / bool / float / int / numpy
  outside the method's loss (whose model code is the method's), counted by patching torch.Tensor."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import diffbase.training.loop as L
from diffbase.config import Config
from diffbase.methods import get, load_all
from diffbase.models.placement import copy_policy, to_device
from diffbase.training.train import train
from tests.helpers import tiny_config
from tests.images import image_folder

# fused (torch._fused_adamw_) against the multi-tensor AdamW over 8 tiny-SD1.5 LoRA steps on this CPU: the
# largest relative loss difference measured was 0 to 2e-7 (a few float32 ulps, growing with the steps); 1e-5
# leaves a 50x margin and is still 100x below what a changed noise draw or learning rate moves (1e-3 and more)
LOSS_RTOL = 1e-5
STEPS = 8


def config_for(tiny_model, tmp_path: Path, name: str, *extra: str) -> Config:
    data = tmp_path / "data"
    if not data.exists():
        image_folder(data, 4)
    return tiny_config("sd15", tiny_model("sd15"), data, tmp_path / name, "training.batch_size=2",
                       f"training.max_steps={STEPS}", "training.learning_rate=1e-2", "logging.report_to=[]",
                       "hardware.gradient_checkpointing=false", *extra)  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in rows(out) if "loss" in r]


def test_the_copy_policy_pins_and_queues_for_cuda_only() -> None:
    assert copy_policy("cpu") == (False, False)
    assert copy_policy(torch.device("cpu")) == (False, False)
    assert copy_policy("cuda") == (True, True) and copy_policy(torch.device("cuda", 1)) == (True, True)
    x = torch.arange(6, dtype=torch.float64)
    same = to_device(x, "cpu")
    assert same is x  # a no-op on the CPU
    like = to_device(x, torch.zeros(1, dtype=torch.float32))
    assert like.dtype == torch.float32 and torch.equal(like, x.float())


def test_reading_every_4_steps_logs_what_reading_every_step_does(tiny_model, tmp_path: Path) -> None:
    load_all()
    method = get("lora")
    runs = {}
    # a checkpoint every 3 steps reads in between the every-4 reads (a read before anything acts on the count)
    for name, extra in (("every1", ["logging.read_every=1"]), ("every4", ["logging.read_every=4"]),
                        ("sync", ["logging.read_every=1", "training.optimizer.fused=false"])):  # fmt: skip
        result = train(config_for(tiny_model, tmp_path, name, "training.checkpoint_every=3", *extra), method,
                       show_progress=False)  # fmt: skip
        assert result.finished and result.steps == STEPS and result.skipped_nonfinite == 0
        runs[name] = result
    assert runs["every1"].optimizer.optimizer.defaults["fused"] is True  # the default where torch has it
    assert not runs["sync"].optimizer.optimizer.defaults["fused"]
    every1, every4, sync = rows(tmp_path / "every1"), rows(tmp_path / "every4"), rows(tmp_path / "sync")
    assert every4 == every1  # every step's row, the same numbers, bit for bit
    assert [r["step"] for r in every4] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in sync] == [r["lr"] for r in every1]
    for got, want in zip(losses(tmp_path / "every4"), losses(tmp_path / "sync"), strict=True):
        assert got == pytest.approx(want, rel=LOSS_RTOL)
    assert (tmp_path / "every4" / "checkpoints" / "step-000006").is_dir()  # the checkpoints at the same steps


@contextlib.contextmanager
def nan_at(call: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The lora method with a NaN loss at its `call`-th loss; and the trained weights before and after that step."""
    load_all()
    method, seen, real_step = get("lora"), {"calls": 0}, L.step

    def loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        value, logs = method.loss(*args, **kwargs)
        seen["calls"] += 1
        return (value * math.nan if seen["calls"] == call else value), logs

    def step(run, batch):  # noqa: ANN001, ANN202
        before = [p.detach().clone() for p in run.trained.trainable]
        out = real_step(run, batch)
        if seen["calls"] == call:
            seen["before"], seen["after"] = before, [p.detach().clone() for p in run.trained.trainable]
            seen["device_skip"] = run.device_skip
        return out

    L.step = step
    try:
        yield dataclasses.replace(method, loss=loss), seen
    finally:
        L.step = real_step


@pytest.mark.parametrize("every", [1, 4])
def test_a_nan_loss_is_skipped_on_the_device_and_counted(every: int, tiny_model, tmp_path: Path) -> None:
    with nan_at(3) as (method, seen):  # the third step's loss
        result = train(config_for(tiny_model, tmp_path, "nan", f"logging.read_every={every}",
                                  "training.schedule.type=cosine", "training.schedule.warmup_steps=0"),
                       method, show_progress=False)  # fmt: skip
    assert seen["device_skip"]  # the fused AdamW skipped it on the device
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"], strict=True))  # weights as they were
    assert result.finished and result.skipped_nonfinite == 1 and result.steps == STEPS
    got = rows(tmp_path / "nan")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # the skipped step has no row, none is missing
    assert all(math.isfinite(r["loss"]) for r in got)
    state = result.optimizer.optimizer.state
    assert all(int(s["step"]) == STEPS for s in state.values())  # the kernel took its step count back
    # the schedule counts taken steps: STEPS rates, the last one's position STEPS - 1 (one cosine per run)
    assert result.optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(STEPS, STEPS), rel=1e-12)
    if every == 1:  # read at once: the host knew before the next step, so the rates are today's
        assert [r["lr"] for r in got] == pytest.approx([lr_at(k, STEPS) for k in range(STEPS)], rel=1e-12)
    else:  # read at step 4: the step after the skip took the next rate; from the read on, today's again
        rates = [lr_at(k, STEPS) for k in (0, 1, 3, 3, 4, 5, 6, 7)]
        assert [r["lr"] for r in got] == pytest.approx(rates, rel=1e-12)


def lr_at(k: int, total: int, lr: float = 1e-2) -> float:
    """Our cosine schedule (no warm-up, floor 0 by default) at position k."""
    from diffbase.config import ScheduleConfig
    from diffbase.training.schedule import lr_factor

    return lr * lr_factor(k, total, lr, ScheduleConfig(type="cosine", warmup_steps=0))


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def test_no_host_read_between_reads(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """Host reads of tensors made by the loop's own step and log (the method's loss excluded) while training
    STEPS steps, read every 4: none with the fused AdamW; with `optimizer.fused: false`, one per step (the
    synchronous non-finite check), which shows the count sees them."""
    load_all()
    method = get("lora")
    state = {"hot": 0, "in_loss": 0, "reads": [], "read_backs": 0}

    def counting(name: str):  # noqa: ANN202
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if state["hot"] and not state["in_loss"]:
                state["reads"].append(name)
            return real(self, *args, **kwargs)

        return wrapper

    def marking(fn, key: str):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            state[key] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state[key] -= 1

        return wrapper

    real_read_back = L.read_back

    def read_back(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        state["read_backs"] += 1
        return real_read_back(*args, **kwargs)

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(L, "step", marking(L.step, "hot"))
    monkeypatch.setattr(L, "log", marking(L.log, "hot"))
    monkeypatch.setattr(L, "read_back", read_back)
    loss = dataclasses.replace(method, loss=marking(method.loss, "in_loss"))
    result = train(config_for(tiny_model, tmp_path, "fused", "logging.read_every=4"), loss, show_progress=False)
    assert result.finished and state["reads"] == [], state["reads"]
    assert state["read_backs"] == STEPS // 4  # steps 4 and 8 (the end)
    state["reads"] = []
    result = train(config_for(tiny_model, tmp_path, "sync", "logging.read_every=4", "training.optimizer.fused=false"),
                   loss, show_progress=False)  # fmt: skip
    # the check's own read, once a step (torch's multi-tensor AdamW reads its CPU step counts too: no GPU sync)
    assert result.finished and state["reads"].count("__bool__") == STEPS, state["reads"]


def test_a_failure_still_writes_the_steps_before_it(tiny_model, tmp_path: Path) -> None:
    """A step that fails between two reads: the steps computed before it are read on the way out (no step is lost
    from metrics.jsonl), and the error is the step's own. (A checkpoint at step 4 keeps the folder: a run that
    fails with nothing to resume removes what it wrote.)"""
    load_all()
    method, calls = get("lora"), {"n": 0}

    def loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("the seventh step fails")
        return method.loss(*args, **kwargs)

    config = config_for(tiny_model, tmp_path, "fails", "logging.read_every=3", "training.checkpoint_every=4")
    with pytest.raises(RuntimeError, match="the seventh step fails"):
        train(config, dataclasses.replace(method, loss=loss), show_progress=False)
    # read at step 3 (every 3), at 4 (the checkpoint), then 5 and 6 on the way out
    assert [r["step"] for r in rows(tmp_path / "fails")] == [1, 2, 3, 4, 5, 6]
