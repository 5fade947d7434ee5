"""Faults injected into `diffbase train` runs (a tiny SD1.5 LoRA, a checkpoint every 4 of 12 steps): a second
run in the same folder, images removed mid-run, a damaged newest checkpoint, a flipped cache byte, SIGTERM and
SIGINT, a kill during a save or the export, a full disk, a resolution that cannot fit in memory. Each checks
that the user gets one line (exit 2, or 143 / 130 for a requested stop), that nothing is lost, and, where the
run can go on, that its final weights and losses equal an uninterrupted run's bit for bit.

Runs are separate processes, paused at a known moment by DIFFBASE_TEST_HOLD (training/checkpoint.py), so no
test depends on how fast this machine is."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tmpfs, write_experiment
from tests.images import image_folder

STEPS = ["training.max_steps=12", "training.checkpoint_every=4", "training.keep_checkpoints=0"]


def experiment(tmp: Path, model: Path, out: Path, *lines: str) -> Path:
    data = image_folder(tmp / "data", 4)
    return write_experiment(tmp / "exp.yaml", "sd15", model, data, out, *lines)


def start(exp: Path, *args: str, hold: str | None = None, memory: int | None = None) -> subprocess.Popen:
    """`diffbase train` in its own process (one thread, as the suite runs), paused at `hold` (WHERE:STEP)
    while the file `exp.hold` exists; with `memory`, on a machine of that many bytes (address space)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DIFFBASE_TEST_HOLD", None)
    if hold is not None:
        release = exp.with_suffix(".hold")
        release.touch()
        Path(f"{release}.held").unlink(missing_ok=True)
        env["DIFFBASE_TEST_HOLD"] = f"{hold}:{release}"
    cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from diffbase.cli import main; "
           "sys.exit(main())", "train", str(exp), *STEPS, *args]  # fmt: skip
    limit = None if memory is None else lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def wait_held(exp: Path, proc: subprocess.Popen) -> None:
    """Until the run reached its hold point (or ended, which fails the test with its output)."""
    held = Path(f"{exp.with_suffix('.hold')}.held")
    while not held.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before its hold point:\n{out}\n{err}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)


def release(exp: Path) -> None:
    exp.with_suffix(".hold").unlink(missing_ok=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """The run's exit code and output. A run that hangs (a bug, not a slow machine: these runs take seconds)
    is killed after 15 minutes so the suite ends."""
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not end in 15 minutes:\n{out}\n{err}")
    return proc.returncode, out, err


def run(exp: Path, *args: str) -> tuple[int, str, str]:
    return finish(start(exp, *args))


def one_error_line(err: str) -> str:
    """The single `error:` line of a run's stderr (progress bars may share it), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def result_of(out: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")), json.loads(
        (out / "losses.json").read_text()
    )


def assert_same_run(out: Path, reference: Path) -> None:
    """The same final LoRA, bit for bit, and the loss of every step, as the uninterrupted run."""
    (weights, losses), (want_weights, want_losses) = result_of(out), result_of(reference)
    assert losses == want_losses
    assert set(weights) == set(want_weights) and all(torch.equal(weights[k], want_weights[k]) for k in weights)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(set(steps))  # every step once, in order
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".export")) or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every fault is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    code, _, err = run(experiment(tmp, tiny_model("sd15"), out))
    assert code == 0, err
    return out


@pytest.fixture
def exp(tiny_model, tmp_path: Path) -> Path:
    return experiment(tmp_path, tiny_model("sd15"), tmp_path / "run")


def test_a_second_run_or_resume_of_a_live_run_is_refused(exp: Path, reference: Path) -> None:
    first = start(exp, hold="step:6")
    try:
        wait_held(exp, first)
        for extra in ((), ("--resume", "latest"), ("--overwrite",)):
            code, _, err = run(exp, *extra)
            assert code == 2 and f"in use by another training run (PID {first.pid} on" in one_error_line(err)
    finally:
        release(exp)
    code, _, err = finish(first)
    assert code == 0, err
    assert_same_run(exp.parent / "run", reference)


def test_a_lock_left_by_a_killed_run_is_taken_over(exp: Path, reference: Path) -> None:
    first = start(exp, hold="save:8")  # killed while writing a checkpoint: the lock and a .tmp folder stay
    wait_held(exp, first)
    first.kill()
    first.wait()
    release(exp)
    out = exp.parent / "run"
    assert (out / ".diffbase.lock").read_text().startswith(str(first.pid))
    assert (out / "checkpoints" / ".tmp-step-000008").is_dir() and not (out / "checkpoints" / "step-000008").exists()
    code, stdout, err = run(exp, "--resume", "latest")
    assert code == 0, err
    assert f"took over the lock of a run that ended without releasing it (PID {first.pid}" in stdout
    assert "resumed from" in stdout and "step-000004" in stdout
    assert_same_run(out, reference)


def test_images_removed_mid_run_stop_with_one_line_and_resume_after_restoring(exp: Path, reference: Path) -> None:
    data = exp.parent / "data"
    kept = exp.parent / "kept"
    first = start(exp, hold="step:5")
    try:
        wait_held(exp, first)
        shutil.copytree(data, kept)
        for image in data.glob("*.png"):
            image.unlink()
    finally:
        release(exp)
    code, _, err = finish(first)
    assert code == 2 and "data: no image could be read in epoch" in one_error_line(err)
    assert "failed, first" in err
    out = exp.parent / "run"
    assert (out / "checkpoints" / "step-000004").is_dir()  # what was saved is kept
    for image in kept.glob("*.png"):
        shutil.copy(image, data / image.name)
    code, _, err = run(exp, "--resume", "latest")
    assert code == 0, err
    assert_same_run(out, reference)


def flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def safetensors_data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("damage", ["flipped weights", "optimizer state cut short", "state file removed"])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(damage: str, exp: Path, reference: Path) -> None:
    out = exp.parent / "run"
    first = start(exp, hold="step:9")  # killed after the checkpoint of step 8
    wait_held(exp, first)
    first.kill()
    first.wait()
    release(exp)
    newest = out / "checkpoints" / "step-000008"
    if damage == "flipped weights":
        weights = next(p for p in newest.glob("*.safetensors") if p.name != "rng.safetensors")
        flip_bytes(weights, safetensors_data_start(weights) + 4)
    elif damage == "optimizer state cut short":
        state = newest / "training_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    else:
        (newest / "state.json").unlink()
    code, _, err = run(exp, "--resume", str(newest))
    assert code == 2 and f"--resume: {newest} " in one_error_line(err)
    code, stdout, err = run(exp, "--resume", "latest")
    assert code == 0, err
    assert f"checkpoint {newest} is damaged" in stdout and "resumed from" in stdout and "step-000004" in stdout
    assert_same_run(out, reference)


def cache_entries(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffbase.data.cache import ShardStore

    store = ShardStore.open(root)
    return {key: store.get(key) for key in store.locations}


def test_a_flipped_cache_byte_is_found_reported_and_recomputed(exp: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = ["data.cache_latents=true", "data.cache_text=true", "data.random_flip=false", "data.crop=center",
              f"data.cache_dir={cache}"]  # fmt: skip
    code, stdout, err = run(exp, *cached)
    assert code == 0, err
    assert "latents: 4 computed, 0 reused" in stdout
    first, written = result_of(exp.parent / "run"), cache_entries(cache / "latents")
    shard = next((cache / "latents").glob("shard-*.safetensors"))
    flip_bytes(shard, safetensors_data_start(shard) + 64, count=1)
    assert len(cache_entries(cache / "latents")) == 3  # the damaged entry is not read
    code, stdout, err = run(exp, *cached, "--overwrite")
    assert code == 0, err
    assert "latents: 1 computed, 3 reused" in stdout and "1 damaged entries recomputed" in stdout
    again = cache_entries(cache / "latents")
    assert set(again) == set(written)
    for (
        key,
        tensors,
    ) in written.items():  # encoded alone, not in a batch of two: equal to float rounding (measured 1.5e-5)
        for name, t in tensors.items():
            torch.testing.assert_close(again[key][name], t, rtol=1e-4, atol=1e-4)
    losses = result_of(exp.parent / "run")[1]
    assert losses == pytest.approx(first[1], rel=1e-4)
    code, stdout, err = run(exp, *cached, "--overwrite")
    assert "latents: 0 computed, 4 reused" in stdout and "damaged" not in stdout  # the new entry is used


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_stop_signal_finishes_the_step_saves_and_resumes_exactly(
    sig: int, code: int, name: str, exp: Path, reference: Path
) -> None:
    first = start(exp, hold="step:5")
    try:
        wait_held(exp, first)
        first.send_signal(sig)
    finally:
        release(exp)
    got, _, err = finish(first)
    out = exp.parent / "run"
    assert got == code, err
    assert f"stopped by {name} after step 5: saved {out / 'checkpoints' / 'step-000005'}" in err
    assert "--resume latest" in err and "Traceback" not in err
    code, _, err = run(exp, "--resume", "latest")
    assert code == 0, err
    assert_same_run(out, reference)


def test_a_kill_during_export_leaves_no_half_written_file(exp: Path, reference: Path) -> None:
    first = start(exp, hold="export:0")
    wait_held(exp, first)
    first.kill()
    first.wait()
    release(exp)
    out = exp.parent / "run"
    assert not (out / "lora").exists() and list(out.glob(".export-*"))  # the files sit only in the staging folder
    code, _, err = run(exp, "--resume", "latest")
    assert code == 0, err
    assert_same_run(out, reference)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB filesystem of its own (tmpfs), where this machine lets the tests mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    with tmpfs(mount, "size=4m"):
        yield mount


def test_a_full_disk_is_one_line_and_a_failed_start_leaves_nothing(
    tiny_model, tmp_path: Path, small_disk: Path, reference: Path
) -> None:
    out = small_disk / "run"
    exp = experiment(tmp_path, tiny_model("sd15"), out)
    first = start(exp, hold="step:2")
    try:
        wait_held(exp, first)
        filler = small_disk / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
    finally:
        release(exp)
    code, _, err = finish(first)
    line = one_error_line(err)
    assert code == 2 and "no space left on device" in line and str(small_disk) in line
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()  # nothing to resume: removed
    filler.unlink()
    code, _, err = run(exp)  # the same command runs again, with no --overwrite
    assert code == 0, err
    assert_same_run(out, reference)


def test_a_resolution_that_cannot_fit_in_memory_is_one_line(exp: Path) -> None:
    # on a machine with 8 GiB of address space, an 8192 px VAE activation (over 8 GiB) cannot be allocated
    code, _, err = finish(start(exp, "data.resolution=8192", "data.max_bucket_side=8192", memory=8 * 2**30))
    line = one_error_line(err)
    assert code == 2 and "out of memory" in line and "data.resolution=8192" in line
    assert not (exp.parent / "run").exists()  # the failed start removed what it wrote
