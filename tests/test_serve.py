"""The web UI without a browser (tests/test_web_ui.py drives one, and runs every tab's first click): the tabs'
handlers as the page calls them (errors as one line in the tab's own status, a painted mask reaching try-on,
results in the gallery with settings that reproduce the same pixels), the path fields under --models-root, the host and auth checks,
training jobs run, queued, stopped and resumed, and the training monitor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbase.errors import UserError

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")

ROOT = Path(__file__).resolve().parents[1]


def plain(value):
    """A component's first value as its preprocess hands it to the tab (gradio's file records as paths)."""
    if isinstance(value, dict) and "path" in value and "url" in value:
        return value["path"]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from diffbase import methods
    from diffbase.serve import Defaults, Limits, build_app

    methods.load_all()
    out = tmp_path_factory.mktemp("serve")
    blocks = build_app(Defaults(device="cpu", out=str(out)), Limits())
    yield blocks.diffbase
    blocks.diffbase.jobs.close()


def defaults(app, name: str) -> list:
    return [plain(c.value) for c in app.tabs[name].components]


def wait_for(condition, seconds: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message and len(message) < 400


def test_errors_are_one_line_in_the_tab_in_the_commands_words(app, tmp_path) -> None:
    import argparse

    import torch

    torch.save({"a": argparse.Namespace()}, tmp_path / "objects.pt")  # an object: weights-only loading refuses it
    tryon = defaults(app, "tryon")
    names = app.tabs["tryon"].names
    cases = {
        "weights": (str(tmp_path / "objects.pt"), "objects.pt holds objects other than tensors"),
        "box": ("30,10,10,40", "garment box: 30,10,10,40 is not a box inside the 48x64 image"),
        "model": (app.defaults.flux1, "SD1.5 model folder: try-on runs on SD1.5 models"),
        "size": ("0x0", "HxW: expected each side at least"),
        "steps": (-1, "steps: expected a whole number at least 1"),
    }
    for field, (value, expected) in cases.items():
        values = list(tryon)
        values[names.index(field)] = value
        image, status, entry = app.tabs["tryon"].handler(*values, session="errors")
        assert image is None and entry is None and expected in status, (field, status)
        assert one_line(status) and "Error" not in status and "IndexError" not in status, status
    person = tmp_path / "person.png"
    Image.new("RGB", (48, 64), (200, 120, 90)).save(person)
    values = list(tryon)
    values[names.index("weights")] = str(person)  # a picture given as weights: the commands' own check
    _, status, _ = app.tabs["tryon"].handler(*values, session="errors")
    assert "trained attention weights (a run's vton/ folder): " in status and one_line(status), status
    values = list(tryon)
    values[names.index("person")] = {"error": "not a readable image", "layers": []}  # the canvas's own refusal
    _, status, _ = app.tabs["tryon"].handler(*values, session="errors")
    assert "person (paint the garment area): not a readable image" in status


def test_a_painted_mask_reaches_try_on_and_the_gallery_reproduces_the_pixels(app, tmp_path) -> None:
    from diffbase.interface import gallery

    values = defaults(app, "tryon")
    names = app.tabs["tryon"].names
    layer = Image.new("RGBA", (48, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (10, 20, 38, 44))  # what the canvas exports: the strokes on transparency
    layer.save(tmp_path / "layer.png")
    values[names.index("person")] = values[names.index("person")] | {"layers": [str(tmp_path / "layer.png")]}
    painted, status, entry = app.tabs["tryon"].handler(*values, session="gallery")
    assert status == ""
    plain_box, _, _ = app.tabs["tryon"].handler(*defaults(app, "tryon"), session="gallery")
    person = np.asarray(Image.open(values[0]["background"]).convert("RGB")).astype(int)
    changed = np.abs(np.asarray(painted).astype(int) - person).sum(-1) > 0
    assert changed[20:44, 10:38].mean() > 0.5 and not changed[:15].any()  # repainted where painted only
    assert not np.array_equal(np.asarray(painted), np.asarray(plain_box))
    kept = gallery.read(entry["path"])  # the settings in the PNG, input pictures copied beside it
    assert kept["tab"] == "tryon" and kept["settings"]["person"]["layers"]
    again, status, _ = app.tabs["tryon"].handler(*[kept["settings"][n] for n in names], session="other")
    assert status == "" and np.array_equal(np.asarray(again), np.asarray(painted))


def test_path_fields_stay_under_the_models_root(tmp_path) -> None:
    from diffbase.serve import App, Defaults, Limits, Models

    root = tmp_path / "models"
    root.mkdir()
    app = App(Defaults(models_root=str(root), out=str(tmp_path / "out")), Limits(), Models(), None, None)
    app.check_path(str(root / "anything"), "SD1.5 model folder")
    app.check_path(app.defaults.sd15, "SD1.5 model folder")  # the shipped toys stay usable
    messages = set()
    for outside in ("/etc", "/etc/passwd", "/no/such/folder", str(root / ".." / "elsewhere"), "~"):
        with pytest.raises(UserError) as err:
            app.check_path(outside, "SD1.5 model folder")
        messages.add(str(err.value))
    assert messages == {f"SD1.5 model folder: not under this server's models folder ({root})"}  # says nothing of it


def test_a_sessions_uploads_are_removed_when_its_page_closes(tmp_path, monkeypatch) -> None:
    from diffbase.interface.gallery import Gallery

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    upload = tmp_path / "uploads" / "abc" / "person.png"
    upload.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(upload)
    gallery = Gallery(tmp_path / "gallery")
    entry = gallery.add("session1", "upscale", "Upscale", Image.new("RGB", (8, 8)), {"image": str(upload)}, {"image"})
    assert Path(entry["settings"]["image"]).is_file() and Path(entry["settings"]["image"]).parent.name == "inputs"
    gallery.forget("session2")
    assert upload.is_file()  # another session's page closing leaves it
    gallery.forget("session1")
    assert not upload.exists() and not upload.parent.exists() and Path(entry["path"]).is_file()  # the result stays


def test_binding_beyond_localhost_needs_a_login(tmp_path, capsys) -> None:
    from diffbase.cli import main
    from diffbase.serve import check_host, read_auth

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0: binding beyond this machine needs --auth" in err
    assert main(["serve", "--models-root", str(tmp_path / "none")]) == 2
    assert "--models-root" in capsys.readouterr().err
    logins = tmp_path / "logins"
    logins.write_text("# people\nann:secret\nbo:pass:word\n")
    assert read_auth(["cy:x"], str(logins)) == [("cy", "x"), ("ann", "secret"), ("bo", "pass:word")]
    check_host("0.0.0.0", [("ann", "secret")])
    check_host("127.0.0.1", [])
    with pytest.raises(UserError, match="--auth: expected USER:PASS"):
        read_auth(["nopassword"], None)


def test_serve_takes_quantize_and_offload() -> None:
    from diffbase.cli import build_parser

    args = build_parser().parse_args(["serve", "--quantize", "fp8", "--offload", "model"])
    assert (args.quantize, args.offload, args.host) == ("fp8", "model", "127.0.0.1")


def test_training_jobs_queue_stop_and_resume(app) -> None:
    """Two jobs of the tiny SD1.5 LoRA: the second waits while the first runs to its export; stopped, the second
    leaves a checkpoint and resumes from it to its own export."""
    from diffbase.interface import jobs as J

    config = str(ROOT / "configs" / "experiments" / "tiny" / "sd15_lora.yaml")
    small = ["training.max_steps=3", "training.checkpoint_every=100", "training.validation.steps=1"]
    first = app.jobs.submit(config, small)
    second = app.jobs.submit(config, [*small, "training.max_steps=30"])  # stopped after its first step
    app.jobs.wait(first.number, (J.RUNNING,), 120)
    assert app.jobs.get(second.number).state == J.WAITING  # one at a time
    done = app.jobs.wait(first.number, (J.FINISHED, J.FAILED), 600)
    assert done.state == J.FINISHED, done.message
    assert "diffusers" in json.loads((first.out / "exports.json").read_text())  # the LoRA, exported
    app.jobs.wait(second.number, (J.RUNNING, J.FINISHED, J.FAILED), 120)
    wait_for(lambda: second.row()[3] >= 1 or second.state != J.RUNNING)  # its first step is logged
    app.jobs.stop(second.number)
    stopped = app.jobs.wait(second.number, (J.STOPPED, J.FINISHED, J.FAILED), 300)
    assert stopped.state == J.STOPPED and any((second.out / "checkpoints").glob("step-*")), stopped.message
    app.jobs.resume(second.number)
    resumed = app.jobs.wait(second.number, (J.FINISHED, J.FAILED), 600)
    assert resumed.state == J.FINISHED, resumed.message
    assert "resumed from" in second.log.read_text()
    assert (second.out / "exports.json").is_file()
    with pytest.raises(UserError, match="only a stopped or failed job resumes"):
        app.jobs.resume(first.number)


def test_uploads_are_refused_by_bytes_and_pixels_before_decoding(tmp_path: Path) -> None:
    from diffbase.serve import Limits, checked_image

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    assert checked_image(str(image), "person", Limits()).size == (64, 64)
    with pytest.raises(UserError, match="person: .* MB is more than the 0 MB limit"):
        checked_image(str(image), "person", Limits(max_bytes=1000))
    with pytest.raises(UserError, match="person: the image is 64x64, beyond the limit of 4000 pixels"):
        checked_image(str(image), "person", Limits(max_pixels=4000))
    with pytest.raises(UserError, match="garment: upload an image"):
        checked_image(None, "garment", Limits())
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    with pytest.raises(UserError, match="person: the image is 20000x20000, beyond the limit"):
        checked_image({"background": str(bomb), "layers": []}, "person", Limits())


def test_monitor_reads_a_run_folder(tmp_path: Path) -> None:
    from diffbase.serve import loss_view, run_view, smoothed

    rows = [{"step": s, "loss": 1 / s, "lr": 0.1} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot, held, lr, grid, status = run_view(tmp_path)
    assert grid is None and "no validation grid yet" in status and status.startswith("step 5; loss 0.2000")
    # a validation metric on another scale (dB) is in the status line, not on the held-out loss plot
    rows[-1] |= {"val_psnr": 21.5}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, with_psnr, _, _, status = run_view(tmp_path)
    assert "; val_psnr 21.5;" in status and np.array_equal(np.asarray(with_psnr), np.asarray(held))
    (tmp_path / "validation").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "validation" / "step-000005.png")
    plot, grid, status = loss_view(str(tmp_path))
    assert plot.size[0] > 100 and grid.size == (20, 10) and "1 validation grid(s)" in status
    assert smoothed([(1, 2.0), (2, 2.0)]) == [(1, 2.0), (2, pytest.approx(2.0))]  # debiased: no ramp from 0
    with pytest.raises(UserError, match="no metrics.jsonl"):
        run_view(str(tmp_path / "nothing"))


def test_a_request_stops_at_its_time_limit_or_on_stop_and_the_next_one_runs() -> None:
    import time

    import gradio as gr

    from diffbase import progress
    from diffbase.serve import Limits, Models, Request, guarded

    models, request = Models(), Request(Limits(max_seconds=0.5))
    steps: list[int] = []

    def slow(n: int) -> str:
        for i in progress.bar(range(n), "work", show=False):
            steps.append(i)
            time.sleep(0.05)
        return "done"

    run = guarded(slow, models, request)
    with pytest.raises(gr.Error, match="ran past the 0.5 s limit"):
        run(1000)
    assert 0 < len(steps) < 1000 and not models.lock.locked()
    steps.clear()

    def stop_soon(n: int) -> str:
        for i in progress.bar(range(n), "work", show=False):
            if i == 3:
                request.stop()  # what the Stop button does, from another thread
            steps.append(i)
        return "done"

    with pytest.raises(gr.Error, match="stopped"):
        guarded(stop_soon, models, request)(1000)
    assert len(steps) == 4
    assert guarded(slow, models, request)(2) == "done"  # the next request starts with a clear flag and clock


def test_a_diffusers_pipeline_stops_between_steps(tiny_model) -> None:
    from diffbase import progress
    from diffbase.generate import GenerateSettings, generate
    from diffbase.models.loading import load_pipeline

    pipe, spec = load_pipeline(tiny_model("flux1"))
    progress.pipeline(pipe, "generate", show=False)
    calls = []

    def reason() -> str | None:
        calls.append(1)
        return "stopped" if len(calls) > 2 else None

    with progress.stop_when(reason), pytest.raises(progress.Cancelled, match="stopped"):
        generate(pipe, spec, GenerateSettings(prompt="a cat", steps=10, height=32, width=32))
    assert len(calls) == 3  # two steps ran, the third was refused


def test_errors_name_the_field_not_the_flag() -> None:
    from diffbase.serve import relabel, user_message

    labels = {"--weights": "trained attention weights", "--model": "SD1.5 model folder"}
    assert relabel("--weights: x.bin is not a PyTorch weights file", labels) == (
        "trained attention weights: x.bin is not a PyTorch weights file"
    )
    assert relabel("--model: try-on runs on an SD1.5 folder", labels).startswith("SD1.5 model folder: try-on")
    assert relabel("steps: expected a whole number", labels) == "steps: expected a whole number"
    message = user_message(IndexError("list index out of range"), labels, "Try-on")
    assert message == "Try-on failed unexpectedly (IndexError); the server's log has the details"
