"""Masks and keypoints from local model folders (diffbase.data.preprocess_models): tiny random SegFormer and ViTPose
models built here test the plumbing (labels by name, the masks, COCO-17 -> OpenPose-18, the JSON diffbase.pose
draws) and `--mask auto` / `--pose auto` / `--ref-mask N=auto` / ControlNet's pose_model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbase.data import preprocess_models as pm
from diffbase.errors import UserError
from diffbase.pose import render_openpose
from tests.helpers import SHAPES, dreamfit_checkpoint, run_cli, tiny_config, write_dreamo_folder

pytest.importorskip("scipy", reason="ViTPose's image processor needs scipy")

ATR = ["Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress", "Belt", "Left-shoe",
       "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm", "Bag", "Scarf"]  # fmt: skip
# What each cloth type repaints, written out by name for the ATR labels (CatVTON's classes that ATR has).
REPAINTED = {
    "upper": {"Upper-clothes", "Dress", "Belt", "Left-arm", "Right-arm"},
    "lower": {"Pants", "Skirt", "Dress", "Belt", "Left-leg", "Right-leg"},
    "overall": {"Upper-clothes", "Dress", "Belt", "Left-arm", "Right-arm", "Pants", "Skirt", "Left-leg", "Right-leg"},
}
KEPT = {"Face", "Hair", "Hat", "Sunglasses", "Bag", "Left-shoe", "Right-shoe", "Scarf"}
# COCO-17 (ViTPose) index of each OpenPose-18 point, written out by name: nose, neck, right arm, left arm, right
# leg, left leg, eyes, ears.
OPENPOSE_FROM_COCO = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


def tiny_parser(folder: Path, names: list[str], permutation: list[int] | None = None, blank: bool = False) -> Path:
    """A random SegFormer with these labels (class j gets the classifier row of class permutation[j]); `blank`:
    every pixel background."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

    order = permutation or list(range(len(names)))
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, patch_sizes=[7, 3],
                             strides=[4, 2], id2label={j: names[order[j]] for j in range(len(names))},
                             label2id={names[order[j]]: j for j in range(len(names))})  # fmt: skip
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config)
    classifier = model.decode_head.classifier
    with torch.no_grad():
        classifier.weight.copy_(classifier.weight[order] * 20)  # strong logits: many classes on a noise image
        classifier.bias.copy_(classifier.bias[order])
        if blank:
            classifier.weight.zero_()
            classifier.bias.copy_(torch.tensor([1.0 if names[o] == "Background" else 0.0 for o in order]))
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def tiny_pose(folder: Path) -> Path:
    """A random ViTPose (COCO's 17 keypoints) at toy size, with its image processor."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                     image_size=[64, 48], patch_size=[16, 16], out_indices=[2])  # fmt: skip
    torch.manual_seed(0)
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(folder)
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preprocess")
    permutation = list(np.random.default_rng(1).permutation(len(ATR)))
    (root / "empty").mkdir()
    return {
        "parser": tiny_parser(root / "parser", ATR),
        "permuted": tiny_parser(root / "permuted", ATR, permutation),
        "blank": tiny_parser(root / "blank", ATR, blank=True),
        "unlabelled": tiny_parser(root / "unlabelled", [f"LABEL_{i}" for i in range(len(ATR))]),
        "pose": tiny_pose(root / "pose"),
        "empty": root / "empty",
    }


def noise(w: int = 40, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def named(labels: np.ndarray, id2label: dict[int, str], names: set[str]) -> np.ndarray:
    return np.isin(labels, [i for i, name in id2label.items() if name in names])


def test_masks_are_the_named_classes_of_the_models_own_argmax_at_the_image_size(models) -> None:
    from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

    image = noise()
    parsing = pm.human_parsing(models["parser"], image)
    model = SegformerForSemanticSegmentation.from_pretrained(models["parser"])
    processor = AutoImageProcessor.from_pretrained(models["parser"])
    with torch.no_grad():  # transformers' own route: logits resized to (H, W), then the best class
        outputs = model(**processor(images=image, return_tensors="pt"))
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(48, 40)])[0].numpy()
    assert parsing.labels.shape == (48, 40) and np.array_equal(parsing.labels, expected)
    assert len(np.unique(expected)) > 6  # the test means something: many classes on the image
    for kind, names in REPAINTED.items():
        exact = np.asarray(pm.garment_mask(parsing.labels, parsing.id2label, kind, dilate=0))
        assert exact.shape == (48, 40) and set(np.unique(exact)) <= {0, 255}
        assert np.array_equal(exact > 0, named(expected, parsing.id2label, names)) and exact.any()
        grown = np.asarray(pm.garment_mask(parsing.labels, parsing.id2label, kind)) > 0  # dilated by 1 px here
        assert grown.sum() > exact.astype(bool).sum() and not (exact.astype(bool) & ~grown).any()
        assert not (grown & named(expected, parsing.id2label, KEPT)).any()
    upper = np.asarray(pm.garment_mask(parsing.labels, parsing.id2label, "upper")) > 0
    assert not (upper & named(expected, parsing.id2label, {"Pants", "Skirt", "Left-leg", "Right-leg"})).any()
    subject = np.asarray(pm.subject_mask(models["parser"], image))
    assert np.array_equal(subject > 0, expected != 0) and set(np.unique(subject)) == {0, 255}


def test_classes_are_looked_up_by_name_so_permuted_ids_give_the_same_masks(models) -> None:
    image = noise(seed=2)
    plain, permuted = pm.human_parsing(models["parser"], image), pm.human_parsing(models["permuted"], image)
    assert not np.array_equal(plain.labels, permuted.labels)
    assert [permuted.id2label[int(v)] for v in permuted.labels.ravel()] == [
        plain.id2label[int(v)] for v in plain.labels.ravel()
    ]
    for kind in pm.CLOTH_TYPES:
        a = pm.garment_mask(plain.labels, plain.id2label, kind)
        assert a.tobytes() == pm.garment_mask(permuted.labels, permuted.id2label, kind).tobytes()
    a, b = pm.foreground(plain.labels, plain.id2label), pm.foreground(permuted.labels, permuted.id2label)
    assert a.tobytes() == b.tobytes()


def test_coco17_becomes_openpose18_with_the_neck_between_the_shoulders() -> None:
    coco = [(10.0 * i, 10.0 * i + 1, 0.5 + i / 100) for i in range(17)]
    points = pm.openpose18(coco)
    assert len(points) == 18
    for k, i in enumerate(OPENPOSE_FROM_COCO):
        if i is not None:
            assert points[k] == coco[i]
    assert points[1] == ((50 + 60) / 2, (51 + 61) / 2, 0.55)  # shoulders 5 (left) and 6 (right); the weaker score
    assert points[2] == coco[6] and points[5] == coco[5]  # OpenPose: 2 right shoulder, 5 left shoulder


def test_pose_keypoints_follow_vitposes_own_route_and_the_json_renders(models, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    image = noise(seed=3)
    model = VitPoseForPoseEstimation.from_pretrained(models["pose"])
    processor = AutoImageProcessor.from_pretrained(models["pose"])
    for box, coco_box in ((None, [0, 0, 40, 48]), ((5.0, 6.0, 30.0, 40.0), [5, 6, 25, 34])):
        points = pm.pose_keypoints(models["pose"], image, box)
        with torch.no_grad():
            outputs = model(**processor(images=image, boxes=[[coco_box]], return_tensors="pt"))
        person = processor.post_process_pose_estimation(outputs, boxes=[[coco_box]])[0][0]
        xy, scores = person["keypoints"].numpy(), person["scores"].numpy()
        for k, i in enumerate(OPENPOSE_FROM_COCO):
            j = i if i is not None else 5
            assert points[k][:2] == pytest.approx(tuple(xy[j]) if i is not None else tuple((xy[5] + xy[6]) / 2))
            assert points[k][2] == pytest.approx(float(scores[j]) if i is not None else float(min(scores[5:7])))
    file = pm.write_keypoints(tmp_path / "k.json", points, image.size)
    data = json.loads(file.read_text())
    flat = data["people"][0]["pose_keypoints_2d"]
    assert len(flat) == 54 and (data["canvas_width"], data["canvas_height"]) == (40, 48)
    assert all(flat[3 * k : 3 * k + 3] == [0, 0, 0] for k in range(18) if points[k][2] < pm.MIN_SCORE)
    assert render_openpose(file, (40, 48)).tobytes() == pm.skeleton(points, (40, 48)).tobytes()
    upright = [(20.0, 8.0 + 2 * k, 1.0) for k in range(18)]  # every point confident: the limbs are drawn
    upright[1], upright[2] = (20.0, 12.0, 1.0), (8.0, 12.0, 1.0)  # neck -> right shoulder: OpenPose's red limb
    drawn = np.asarray(render_openpose(pm.write_keypoints(tmp_path / "u.json", upright, (40, 48)), (40, 48)))
    assert tuple(drawn[12, 14]) == (255, 0, 0)
    assert pm.mask_box(pm.subject_mask(models["blank"], image)) is None
    assert pm.mask_box(Image.fromarray(np.pad(np.full((4, 6), 255, np.uint8), ((2, 3), (1, 2))))) == (1, 2, 7, 6)


def test_commands_compute_masks_and_keypoints_with_auto(models, tiny_model, tmp_path: Path) -> None:
    from diffbase.models.loading import load_pipeline

    person = tmp_path / "person.png"
    noise(32, 32, seed=4).save(person)
    parsing = pm.human_parsing(models["parser"], noise(32, 32, seed=4))
    out = tmp_path / "tryon.png"
    tryon = ["tryon", "--method", "catvton", "--model", str(tiny_model("sd15")), "--person", str(person),
             "--garment", str(person), "--size", "32x32", "--steps", "1"]  # fmt: skip
    code, stdout, err = run_cli(*tryon, "--mask", "auto", "--parser", str(models["parser"]), "--cloth-type", "lower",
                                "--out", str(out))  # fmt: skip
    assert code == 0, err
    saved = Image.open(tmp_path / "tryon_mask.png")
    assert saved.tobytes() == pm.garment_mask(parsing.labels, parsing.id2label, "lower").tobytes()
    assert json.loads(Image.open(out).text["diffbase"])["cloth_type"] == "lower" and "tryon_mask.png" in stdout
    out.unlink()
    code, _, err = run_cli(*tryon, "--mask", "auto", "--parser", str(models["parser"]), "--out", str(out))
    assert code == 2 and "tryon_mask.png (the computed input, saved beside --out) exists" in err  # not overwritten
    ckpt = dreamfit_checkpoint(tiny_model, tmp_path)
    fit = ["dreamfit", "--model", str(tiny_model("flux1")), "--checkpoint", str(ckpt), "--garment", str(person),
           "--prompt", "a person", "--size", "32x32", "--steps", "1", "--pose", "auto"]  # fmt: skip
    who = ["--person", str(person), "--pose-model", str(models["pose"])]
    code, _, err = run_cli(*fit, *who, "--mode", "pose", "--out", str(tmp_path / "pose.png"))
    assert code == 0, err
    assert json.loads(Image.open(tmp_path / "pose.png").text["diffbase"])["pose"] == "auto"
    keypoints = tmp_path / "pose_keypoints.json"
    expected = pm.openpose_json(pm.pose_keypoints(models["pose"], Image.open(person).convert("RGB")), (32, 32))
    assert json.loads(keypoints.read_text()) == expected
    code, _, err = run_cli(*fit, *who, "--mode", "tryon", "--mask", "auto", "--parser", str(models["parser"]),
                           "--out", str(tmp_path / "fit.png"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "fit_mask.png").exists() and (tmp_path / "fit_keypoints.json").exists()
    assert json.loads(Image.open(tmp_path / "fit.png").text["diffbase"])["cloth_type"] == "upper"
    code, _, err = run_cli(*fit, *who[:3], str(models["parser"]), "--mode", "pose", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "not ViTPose" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(*fit, *who[2:], "--mode", "pose", "--out", str(tmp_path / "x.png"))  # no --person
    assert code == 2 and "--pose auto: needs --person" in err, err
    dreamo = tmp_path / "dreamo"
    dreamo.mkdir()
    write_dreamo_folder(load_pipeline(tiny_model("flux1"))[0], dreamo)
    customize = ["dreamo", "--model", str(tiny_model("flux1")), "--dreamo", str(dreamo), "--version", "none",
                 "--ref", f"{person}:ip", "--ref-mask", "1=auto", "--prompt", "[ref#1]", "--size", "32x32",
                 "--steps", "1", "--ref-res", "32", "--parser", str(models["parser"])]  # fmt: skip
    code, _, err = run_cli(*customize, "--out", str(tmp_path / "o.png"))
    assert code == 0, err
    code, _, err = run_cli(*customize[:-4], "--out", str(tmp_path / "o2.png"))  # no --parser
    assert code == 2 and "--ref-mask 1=auto: needs --parser" in err, err
    assert Image.open(tmp_path / "o.png").size == (32, 32)
    subject = Image.open(tmp_path / "o_ref1_mask.png")
    assert subject.tobytes() == pm.foreground(parsing.labels, parsing.id2label).tobytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "auto"], "--parser: give a local human-parsing"),
        (["--mask", "auto", "--parser", "/no/such/dir"], "--parser: /no/such/dir is not a folder"),
        (["--mask", "auto", "--parser", "{empty}"], "not a transformers model folder"),
        (["--mask", "auto", "--parser", "{pose}"], "are not a human parser's"),
        (["--mask", "auto", "--parser", "{unlabelled}"], "(LABEL_0, LABEL_1, LABEL_2, LABEL_3, LABEL_4, ...)"),
        (["--mask", "auto", "--parser", "{blank}"], "--mask auto: the parser found no upper garment"),
    ],
)
def test_bad_model_folders_are_one_line_errors(models, tiny_model, tmp_path: Path, extra, message) -> None:
    person = tmp_path / "p.png"
    noise(32, 32).save(person)
    extra = [e.format(**{k: str(v) for k, v in models.items()}) for e in extra]
    code, _, err = run_cli("tryon", "--model", str(tiny_model("sd15")), "--person", str(person), "--garment",
                           str(person), "--size", "32x32", *extra, "--out", str(tmp_path / "r.png"))  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "r_mask.png").exists()


def test_controlnet_pose_controls_from_a_pose_model_where_no_keypoints_file_is(models, tiny_model, tmp_path) -> None:
    from diffbase.methods import get

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.open(SHAPES / f"{i:03d}.png").convert("RGB").save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text("a shape")
    flat = [v for k in range(18) for v in (10 + 2 * k, 5 + 3 * k, 1.0)]
    (data / "000_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    overrides = ["training.method=controlnet", "training.controlnet.conditioning_type=pose",
                 f"training.controlnet.pose_model={models['pose']}"]  # fmt: skip
    config = tiny_config("sd15", tiny_model("sd15"), data, tmp_path / "run", *overrides)
    first, second = (Image.open(rec.control) for rec in get("controlnet").dataset(config, False, None).records)
    assert first.tobytes() == render_openpose(data / "000_keypoints.json", (64, 64)).tobytes()
    image = Image.open(data / "001.png").convert("RGB")
    assert second.tobytes() == pm.skeleton(pm.pose_keypoints(models["pose"], image), image.size).tobytes()
    with pytest.raises(UserError, match="training.controlnet.pose_model: /no/such is not a folder"):
        tiny_config("sd15", tiny_model("sd15"), data, tmp_path / "run", *overrides[:2],
                    "training.controlnet.pose_model=/no/such")  # fmt: skip
