"""The web UI's shared pieces without a server: the Train tab's jobs table re-reads a job's metrics only when the
file changed, the one rule for "a mask file or a painted area", and the path fields' labels matching the built
tabs' fields (so --models-root's check cannot drift from them)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from diffbase.errors import UserError
from diffbase.interface.web import Limits, chosen_mask


def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every read_metrics call from here on, by path."""
    from diffbase.training import metrics

    calls: list[Path] = []
    real = metrics.read_metrics

    def read(path: Path) -> list[dict]:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(metrics, "read_metrics", read)
    return calls


def test_the_jobs_table_reads_a_jobs_metrics_only_when_they_changed(tmp_path: Path, monkeypatch) -> None:
    from diffbase.interface.jobs import RUNNING, Job, view_key

    calls = counted_reads(monkeypatch)
    job = Job(1, "configs/x.yaml", [], tmp_path / "run", tmp_path / "job-1.log")
    assert job.row()[3] == 0 and calls == []  # no metrics.jsonl yet: nothing read
    job.out.mkdir()
    metrics = job.out / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert job.row()[3] == 1 and job.row()[3] == 1 and len(calls) == 1  # two ticks, one read
    shown = view_key(job)
    assert view_key(job) == shown  # nothing changed: the view stays
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.4}) + "\n")
    assert job.row()[3] == 2 and len(calls) == 2  # the trainer logged: read again
    assert view_key(job) != shown
    for change in (lambda: (job.out / "validation").mkdir(), lambda: job.log.write_text("step 2\n"),
                   lambda: setattr(job, "state", RUNNING)):  # fmt: skip
        shown = view_key(job)
        change()
        assert view_key(job) != shown  # a grid, a log line or a new state is shown too
    assert job.row()[3] == 2 and len(calls) == 2


def canvas(tmp_path: Path, painted: bool) -> dict:
    """A canvas value as gradio hands it over: the picture and its layers (a stroke when `painted`)."""
    folder = tmp_path / ("painted" if painted else "blank")
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (32, 24), (90, 90, 90)).save(folder / "picture.png")
    layer = Image.new("RGBA", (32, 24), (0, 0, 0, 0))
    if painted:
        layer.paste((255, 0, 255, 255), (4, 4, 12, 10))
    layer.save(folder / "layer.png")
    return {"background": str(folder / "picture.png"), "layers": [str(folder / "layer.png")]}


def choose(value: dict, mask: str | None, limits: Limits | None = None) -> Image.Image:
    picture = Image.open(value["background"]).convert("RGB")
    return chosen_mask(
        value, mask, limits or Limits(), picture, "person (paint)", "mask file (x)", "paint the garment area"
    )


def test_a_mask_file_or_a_painted_area_one_rule(tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    file_area = Image.new("L", (32, 24), 0)
    file_area.paste(255, (20, 10, 30, 20))
    file_area.save(mask)
    assert choose(canvas(tmp_path, False), str(mask)).getbbox() == (20, 10, 30, 20)  # the file alone
    assert choose(canvas(tmp_path, True), None).getbbox() == (4, 4, 12, 10)  # the strokes alone
    messages = []
    for value, given in ((canvas(tmp_path, True), str(mask)), (canvas(tmp_path, False), None)):
        with pytest.raises(UserError) as err:
            choose(value, given)
        messages.append(str(err.value))
    assert messages == [
        "mask file (x): give a mask file or paint the area on the picture, not both (clear one)",
        "person (paint): paint the garment area (or give a mask file)",
    ]
    with pytest.raises(UserError, match=r"^person \(paint\): the painted layer is 32x24, beyond"):
        choose(canvas(tmp_path, True), str(mask), Limits(max_pixels=100))  # the canvas's own check comes first


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    """The built app's shared state (its tabs, as App.wire recorded them)."""
    pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'diffbase[ui]')")
    from diffbase import methods
    from diffbase.serve import Defaults, build_app

    methods.load_all()
    blocks = build_app(Defaults(device="cpu", out=str(tmp_path_factory.mktemp("serve"))), Limits())
    yield blocks.diffbase
    blocks.diffbase.jobs.close()


def test_every_path_field_is_a_field_of_a_wired_tab(app) -> None:
    """App.handler checks a value under --models-root by its field's label: a PATH_FIELDS label no wired tab
    has is a check that never runs (FLAGS likewise names fields by label)."""
    from diffbase.interface.web import FLAGS, PATH_FIELDS

    labels = {getattr(c, "label", None) for tab in app.tabs.values() for c in tab.components}
    assert not PATH_FIELDS - labels, PATH_FIELDS - labels
    assert not set(FLAGS) - labels, set(FLAGS) - labels


def plain(value: Any) -> Any:
    """A component's first value as its preprocess hands it to the tab (gradio's file records as paths)."""
    if isinstance(value, dict) and "path" in value and "url" in value:
        return value["path"]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, list) else value


def test_the_edit_and_dreamfit_tabs_take_a_mask_file_or_a_painted_area_alike(app, tmp_path: Path) -> None:
    """Both tabs through the one rule (web.chosen_mask): both given, or neither, is the same one-line refusal."""
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (4, 4, 20, 20))
    layer.save(tmp_path / "layer.png")
    tabs = {"edit": ("image", {"kind": "inpaint", "model": app.defaults.fill}),
            "dreamfit": ("person", {"mode": "tryon"})}  # fmt: skip
    said: dict[str, list[str]] = {}
    for name, (picture, fixed) in tabs.items():
        info = app.tabs[name]
        for mask, layers in ((str(tmp_path / "mask.png"), [str(tmp_path / "layer.png")]), (None, [])):
            values = dict(zip(info.names, (plain(c.value) for c in info.components), strict=True)) | fixed
            values["mask"], values[picture] = mask, values[picture] | {"layers": layers}
            image, status, _ = info.handler(*values.values(), session="masks")
            assert image is None and "\n" not in status, status
            said.setdefault(name, []).append(status.removeprefix("**error:** "))
    (edit_both, edit_neither), (fit_both, fit_neither) = said["edit"], said["dreamfit"]
    both = ": give a mask file or paint the area on the picture, not both (clear one)"
    assert (edit_both, fit_both) == ("mask file (inpaint)" + both, "mask file (try-on)" + both)
    assert edit_neither == "image (paint the area to fill): paint the area to fill on the image (or give a mask file)"
    assert fit_neither.startswith("person (try-on: paint the garment area): paint the garment area")
    assert fit_neither.endswith("(or give a mask file)")


def test_the_train_tab_draws_a_jobs_view_again_only_when_it_changed(tmp_path: Path, monkeypatch) -> None:
    """The timer's tick (every 2 s) with nothing new: no plot drawn, the page keeps its own (gr.skip())."""
    import gradio as gr

    from diffbase import serve
    from diffbase.interface.jobs import Jobs

    jobs = Jobs(tmp_path)
    jobs.close()  # no worker: the job stays as written here
    job = jobs.submit("configs/x.yaml", [])
    job.out.mkdir(parents=True)
    (job.out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "lr": 0.1}) + "\n")
    drawn: list[Path] = []
    real = serve.run_view
    monkeypatch.setattr(serve, "run_view", lambda folder: drawn.append(folder) or real(folder))
    app = SimpleNamespace(jobs=jobs)
    first = serve.job_view(app, None)  # type: ignore[arg-type]
    again = serve.job_view(app, None, first[-1])  # type: ignore[arg-type]
    assert len(drawn) == 1 and first[1] is not None and first[-1] is not None
    assert again[0] == first[0] and all(isinstance(v, type(gr.skip())) for v in again[1:-1])
    assert again[-1] == first[-1]
    with (job.out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.4, "lr": 0.1}) + "\n")
    third = serve.job_view(app, None, again[-1])  # type: ignore[arg-type]
    assert len(drawn) == 2 and third[-1] != first[-1] and third[0][0][3] == 2 and "step 2" in third[5]


def test_a_tabs_fresh_model_gets_the_runtimes_attention_and_compile_once(app, tmp_path: Path, monkeypatch) -> None:
    """As the commands do after loading (Runtime.use: the attention choice, and --compile's blocks): the web tabs
    too, once per model loaded (serve --compile was parsed and then ignored before)."""
    from diffbase.runtime import Runtime

    used: list[tuple[list[Any], bool]] = []
    monkeypatch.setattr(Runtime, "use", lambda self, models, backend=True: used.append((models, backend)))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (4, 4, 20, 20))
    layer.save(tmp_path / "layer.png")
    info = app.tabs["edit"]
    values = dict(zip(info.names, (plain(c.value) for c in info.components), strict=True))
    values |= {"kind": "inpaint", "model": app.defaults.fill, "mask": None, "steps": 2}
    values["image"] = values["image"] | {"layers": [str(tmp_path / "layer.png")]}
    for _ in range(2):  # the second request finds the model loaded: not prepared again
        image, status, _ = info.handler(*values.values(), session="use")
        assert image is not None, status
    pipe, _ = app.models.value
    assert used == [([pipe.transformer], True)]


def test_serve_compile_reaches_the_runtime(monkeypatch) -> None:
    from diffbase import cli, serve

    seen = []
    monkeypatch.setattr(serve, "serve", lambda host, port, defaults, limits, auth=None: seen.append(defaults))
    assert cli.main(["serve", "--device", "cpu", "--compile"]) == 0
    assert seen[0].compile == "default"
