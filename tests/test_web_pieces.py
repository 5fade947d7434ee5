"""The web UI's shared pieces without a server: the Train tab's jobs table re-reads a job's metrics only when the
file changed, the one rule for "a mask file or a painted area", and the path fields' labels matching the built
tabs' fields (so --models-root's check cannot drift from them)."""

from __future__ import annotations

import json
from pathlib import Path

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
