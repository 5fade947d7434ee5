"""ControlNet controls computed from the data (training.controlnet.conditioning_type): Canny edges, depth from
a local model folder, OpenPose skeletons from keypoints files; cached once; bad settings are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbase.config import configs_dir, load_config
from diffbase.data.datasets import to_pil
from diffbase.errors import UserError
from diffbase.methods import get
from diffbase.pose import render_openpose
from tests.helpers import SHAPES, TINY_MODELS, run_cli, tiny_config

cv2 = pytest.importorskip("cv2")

# The design document's section, as written.
DESIGN = """training:
  method: "controlnet"
  controlnet:
    conditioning_type: "canny"
    conditioning_scale: 1.0
  batch_size: 2
  max_steps: 2
  checkpoint_every: 0
  learning_rate: 1.0e-3
  validation: {prompts: [a red square], steps: 2}
"""


def shapes_without_controls(root: Path, n: int = 4, size: tuple[int, int] | None = None) -> Path:
    """The shipped shapes and captions with no metadata (so no control entries), resized to `size` (w, h)."""
    root.mkdir(parents=True)
    for i in range(n):
        img = Image.open(SHAPES / f"{i:03d}.png").convert("RGB")
        (img.resize(size, Image.BICUBIC) if size else img).save(root / f"{i:03d}.png")
        shutil.copy(SHAPES / f"{i:03d}.txt", root / f"{i:03d}.txt")
    return root


def experiment(path: Path, model: Path, data: Path, out: Path, body: str = DESIGN) -> Path:
    base = configs_dir() / "models" / f"{TINY_MODELS['sd15']}.yaml"
    head = f"_base_: [{base}]\nexperiment: {{output_dir: {out}}}\nmodel: {{pretrained_path: {model}}}\n"
    path.write_text(head + f"data: {{train_path: {data}, resolution: 64, min_bucket_side: 64}}\n" + body)
    return path


def controlnet_dataset(config):  # noqa: ANN001, ANN201
    return get("controlnet").dataset(config, False, None)


def test_design_config_computes_canny_controls_trains_and_matches_cv2(tiny_model, tmp_path: Path) -> None:
    data = shapes_without_controls(tmp_path / "data", size=(96, 80))  # scaled to 77x64, then cut to 64x64
    out = tmp_path / "run"
    exp = experiment(tmp_path / "exp.yaml", tiny_model("sd15"), data, out)
    code, stdout, err = run_cli("train", str(exp))
    assert code == 0, err
    assert "controls: computed 4 canny image(s)" in stdout
    assert (out / "controlnet").is_dir() and (out / "validation" / "step-000002.png").exists()
    stored = sorted((out / "controls" / "canny").glob("*.png"))
    assert len(stored) == 4
    dataset = controlnet_dataset(load_config(out / "config.yaml"))
    for i, rec in enumerate(dataset.records):
        assert rec.control in stored
        scaled = Image.open(rec.image).convert("RGB").resize((77, 64), Image.BICUBIC)
        edges = cv2.Canny(np.asarray(scaled), 100, 200)
        control = np.asarray(Image.open(rec.control))
        assert control.shape == (64, 77, 3) and np.array_equal(control, np.stack([edges] * 3, -1))
        assert set(np.unique(edges)) == {0, 255}
        item = np.asarray(to_pil(dataset[i]["control"]))  # what the ControlNet sees: cut like the image
        assert np.array_equal(item, control[:, 6:70])
    code, stdout, _ = run_cli("train", str(exp), "--overwrite")  # computed once: the next run reads them
    assert code == 0 and "controls: computed" not in stdout


def tiny_depth_model(folder: Path) -> Path:
    """A random DPT depth model at toy size, saved as a local transformers folder with its processor."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                       patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])  # fmt: skip
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_depth_from_a_local_model_folder(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_depth_model(tmp_path / "dpt")
    data = shapes_without_controls(tmp_path / "data", n=2)
    config = tiny_config(
        "sd15", tiny_model("sd15"), data, tmp_path / "run", "training.method=controlnet",
        "training.controlnet.conditioning_type=depth", f"training.controlnet.depth_model={model}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    dataset = controlnet_dataset(config)
    assert "controls: computed 2 depth image(s)" in capsys.readouterr().out
    depths = [np.asarray(Image.open(rec.control)) for rec in dataset.records]
    assert all(rec.control.parent == tmp_path / "cache" / "controls" / "depth" for rec in dataset.records)
    for d in depths:
        assert d.shape == (64, 64, 3) and d.min() == 0 and d.max() == 255
        assert np.array_equal(d[..., 0], d[..., 1]) and np.array_equal(d[..., 0], d[..., 2])
    assert not np.array_equal(depths[0], depths[1])
    again = controlnet_dataset(config)  # read back, not computed again
    assert [r.control for r in again.records] == [r.control for r in dataset.records]
    assert "controls: computed" not in capsys.readouterr().out


def test_pose_from_keypoints_files(tiny_model, tmp_path: Path) -> None:
    data = shapes_without_controls(tmp_path / "data", n=2)
    person = [32, 10, 1, 32, 20, 1, 24, 20, 1, 20, 32, 1, 18, 44, 1, 40, 20, 1, 44, 32, 1, 46, 44, 1]
    for i in range(2):
        people = [{"pose_keypoints_2d": person}] if i == 0 else []  # nobody in the second image: a black control
        (data / f"{i:03d}_keypoints.json").write_text(json.dumps({"people": people}))
    config = tiny_config("sd15", tiny_model("sd15"), data, tmp_path / "run", "training.method=controlnet",
                         "training.controlnet.conditioning_type=pose")  # fmt: skip
    first, second = (np.asarray(Image.open(rec.control)) for rec in controlnet_dataset(config).records)
    assert np.array_equal(first, np.asarray(render_openpose(data / "000_keypoints.json", (64, 64))))
    assert first.max() == 255 and second.max() == 0
    (data / "001_keypoints.json").unlink()
    with pytest.raises(UserError, match=r"001\.png: no keypoints file 001_keypoints\.json"):
        controlnet_dataset(config)


def test_given_controls_are_kept_whatever_the_type(tiny_model, tmp_path: Path) -> None:
    config = tiny_config("sd15", tiny_model("sd15"), SHAPES, tmp_path / "run", "training.method=controlnet",
                         "training.controlnet.conditioning_type=canny")  # fmt: skip
    assert all(rec.control.parent == SHAPES for rec in controlnet_dataset(config).records)
    assert not (tmp_path / "run" / "controls").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["training.controlnet.conditioning_type=cany"],
         "exp.yaml: training.controlnet.conditioning_type: expected one of 'given', 'canny', 'depth', 'pose'"),
        (["training.controlnet.conditioning_type=depth"], "training.controlnet.depth_model: required"),
        (["training.controlnet.conditioning_type=depth", "training.controlnet.depth_model=/no/such/dir"],
         "training.controlnet.depth_model: /no/such/dir is not a folder"),
        (["training.controlnet.conditioning_type=given"], "000.png: no 'control' image in the metadata"),
    ],
    ids=["unknown-type", "depth-without-model", "depth-model-not-a-folder", "given-without-controls"],
)  # fmt: skip
def test_bad_settings_are_one_line(overrides: list[str], expected: str, tiny_model, tmp_path: Path) -> None:
    data = shapes_without_controls(tmp_path / "data", n=2)
    exp = experiment(tmp_path / "exp.yaml", tiny_model("sd15"), data, tmp_path / "run")
    if overrides[0].endswith("cany"):  # in the file, so the error names the file
        exp.write_text(exp.read_text().replace('conditioning_type: "canny"', 'conditioning_type: "cany"'))
        overrides = []
    code, _, err = run_cli("train", str(exp), *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_canny_without_opencv_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffbase.data.controls import canny

    monkeypatch.setitem(__import__("sys").modules, "cv2", None)  # `import cv2` now fails
    with pytest.raises(UserError, match="pip install opencv-python-headless"):
        canny(Image.new("RGB", (8, 8)))


def test_an_image_that_fails_to_decode_is_skipped_as_data_on_bad_file_says(tiny_model, tmp_path: Path) -> None:
    data = shapes_without_controls(tmp_path / "data", n=3)
    Image.open(data / "002.png").save(data / "002.jpg")
    (data / "002.png").unlink()
    whole = (data / "002.jpg").read_bytes()
    (data / "002.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    config = tiny_config("sd15", tiny_model("sd15"), data, tmp_path / "run", "training.method=controlnet",
                         "training.controlnet.conditioning_type=canny")  # fmt: skip
    dataset = controlnet_dataset(config)
    assert dataset.records[2].control == data / "002.jpg" and dataset[2] is None
    assert dataset[0] is not None and "002.jpg" in dataset.report.summary()
