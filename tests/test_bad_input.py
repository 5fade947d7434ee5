"""Bad input to every model-running command, as a new user or an attacker gives it: each case is one line
(`error: ...` naming the flag), exit 2, no traceback, nothing written, and refused before any model loads
(the loaders are replaced by ones that fail the test if called)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffbase.config import configs_dir
from tests.helpers import run_cli, tmpfs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    made = {
        "person": Image.new("RGB", (32, 32), (200, 120, 90)),
        "garment": Image.new("RGB", (32, 32), (20, 60, 200)),
        "mask": Image.new("L", (32, 32), 0),
        "black": Image.new("L", (32, 32), 0),
        "small_mask": Image.new("L", (16, 16), 255),
        "wide": Image.new("RGB", (5000, 3), (10, 10, 10)),
    }
    made["mask"].paste(255, (8, 8, 24, 24))
    out = {}
    for name, image in made.items():
        out[name] = root / f"{name}.png"
        image.save(out[name])
    out["checkpoint"] = root / "flux_i2i.bin"
    torch.save({}, out["checkpoint"])
    out["pickle"] = root / "weights.bin"
    out["pickle"].write_bytes(pickle.dumps({"a": 1}))
    out["text"] = root / "weights.safetensors"
    out["text"].write_text("not weights")
    out["folder"] = root / "a-folder.png"
    out["folder"].mkdir()
    out["prompts"] = root / "prompts.txt"
    out["prompts"].write_text("a cat\n")
    out["broken"] = root / "broken"  # a folder whose one image is a text file
    out["broken"].mkdir()
    (out["broken"] / "x.png").write_text("not an image")
    out["badmodel"] = root / "badmodel"  # a damaged download: model_index.json is not text
    out["badmodel"].mkdir()
    (out["badmodel"] / "model_index.json").write_bytes(b"\xff\xfe\x00\x01")
    out["originals"] = root / "originals"
    out["originals"].mkdir()
    made["person"].save(out["originals"] / "x.png")
    out["dreamo"] = root / "dreamo"
    out["dreamo"].mkdir()
    (out["dreamo"] / "dreamo.safetensors").write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory):
    """A folder nobody can write in: a read-only tmpfs where root runs the tests, else a mode-555 folder."""
    folder = tmp_path_factory.mktemp("read-only")
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: only a read-only filesystem refuses it
        with tmpfs(folder, "ro,size=1m"):
            yield folder
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def cases(f: dict[str, Path], m: dict[str, Path], out: Path, ro: Path) -> dict[str, tuple[list[str], str]]:
    """id -> (argv, what the error line says). `m`: tiny model folders; `out`: where results would go."""
    o = str(out / "r.png")
    edit = ["edit", "--model", str(m["kontext"]), "--image", str(f["person"]), "--prompt", "red", "--out", o]
    inpaint = ["inpaint", "--model", str(m["fill"]), "--image", str(f["person"]), "--mask", str(f["mask"]),
               "--prompt", "red", "--out", o]  # fmt: skip
    customize = ["customize", "--model", str(m["flux1"]), "--dreamo", str(f["dreamo"]), "--version", "none",
                 "--ref", f"{f['garment']}:ip", "--prompt", "[ref#1]", "--size", "32x32", "--out", o]  # fmt: skip
    upscale = ["upscale", str(f["person"]), "--model", str(m["flux1"]), "--out", o]
    bare = ["tryon", "--model", str(m["sd15"]), "--person", str(f["person"]), "--garment", str(f["garment"]),
            "--size", "32x32", "--out", o]  # fmt: skip
    tryon = [*bare, "--mask", str(f["mask"])]
    dreamfit = ["dreamfit", "--model", str(m["flux1"]), "--checkpoint", str(f["checkpoint"]), "--garment",
                str(f["garment"]), "--prompt", "a shirt", "--out", o]  # fmt: skip
    generate = ["generate", "--model", str(m["flux1"]), "--prompt", "a cat", "--size", "32x32", "--out", o]
    return {
        "edit steps -1": ([*edit, "--steps", "-1"], "--steps: expected a whole number at least 1, got -1"),
        "edit steps 0": ([*edit, "--steps", "0"], "--steps: expected a whole number at least 1"),
        "inpaint steps -1": ([*inpaint, "--steps", "-1"], "--steps:"),
        "customize steps -1": ([*customize, "--steps", "-1"], "--steps:"),
        "upscale steps -1": ([*upscale, "--steps", "-1"], "--steps:"),
        "tryon steps -5": ([*tryon, "--steps", "-5"], "--steps:"),
        "dreamfit steps 0": ([*dreamfit, "--steps", "0"], "--steps:"),
        "generate steps 0": ([*generate, "--steps", "0"], "--steps:"),
        "inpaint strength 1.5": ([*inpaint, "--strength", "1.5"], "--strength: expected a number in (0, 1]"),
        "inpaint strength -0.1": ([*inpaint, "--strength", "-0.1"], "--strength:"),
        "inpaint strength 0": ([*inpaint, "--strength", "0"], "--strength:"),
        "inpaint strength nan": ([*inpaint, "--strength", "nan"], "--strength:"),
        "upscale strength 0": ([*upscale, "--strength", "0"], "--strength:"),
        "edit guidance -1": ([*edit, "--guidance", "-1"], "--guidance:"),
        "tryon eta -1": ([*tryon, "--eta", "-1"], "--eta:"),
        "out in a read-only folder": ([*edit[:-1], str(ro / "e.png")], "--out: cannot write in"),
        "out is a folder": ([*edit[:-1], str(f["folder"])], "is a folder"),
        "grid in a read-only folder": ([*edit, "--grid", str(ro / "g.png")], "--grid: cannot write in"),
        "out in a missing folder": ([*edit[:-1], "/missing-diffbase/sub/e.png"], "the folder /missing-diffbase/sub"),
        "upscale onto its input": (
            ["upscale", str(f["person"]), str(f["person"]), "--model", str(m["flux1"])],
            "is also an input",
        ),  # fmt: skip
        "out with no image suffix": ([*edit[:-1], str(out / "r.txt")], "has no image suffix"),
        "edit a 5000x3 image": ([*edit[:3], "--image", str(f["wide"]), *edit[5:]], "5000x3"),
        "tryon weights a pickle": ([*tryon, "--weights", str(f["pickle"])], "is not a PyTorch weights file"),
        "tryon weights a text file": ([*tryon, "--weights", str(f["text"])], "is not a safetensors file"),
        "dreamfit checkpoint a pickle": ([*dreamfit, "--checkpoint", str(f["pickle"])], "--checkpoint:"),
        "tryon all-black mask": ([*bare, "--mask", str(f["black"])], "the mask is empty"),
        "tryon mask of another size": ([*bare, "--mask", str(f["small_mask"])], "16x16"),
        "tryon box outside the person": ([*bare, "--box", "40,40,60,60"], "--box: 40,40,60,60 is not a box inside"),
        "tryon mask and box": ([*tryon, "--box", "1,1,9,9"], "give exactly one"),
        "upscale overlap -8": ([*upscale, "--overlap", "-8"], "--overlap: expected 0 <= overlap"),
        "upscale tile 7": ([*upscale, "--tile", "7"], "--tile: expected a multiple of"),
        "upscale overlap 64 tile 32": ([*upscale, "--overlap", "64", "--tile", "32"], "--overlap:"),
        "upscale scale 100": ([*upscale, "--scale", "100", "--max-tiles", "4"], "--max-tiles: a 3200x3200 result"),
        "upscale scale 0": ([*upscale, "--scale", "0"], "--scale: expected a number above 0"),
        "upscale dino without adapter": ([*upscale, "--dino", str(m["flux1"])], "give both"),
        "customize ref#3 of one": ([*customize[:-5], "[ref#3]", *customize[-4:]], "[ref#3] names no reference"),
        "customize size 0x0": ([*customize[:-3], "0x0", *customize[-2:]], "--size: expected each side at least"),
        "customize missing ref": ([*customize[:7], "--ref", "/nothing/x.png:ip", *customize[9:]], "x.png"),
        "customize v1.1 without its LoRAs": (
            [*customize[:6], "v1.1", *customize[7:]],
            "dreamo_cfg_distill.safetensors: no such file (--version v1.1 fuses it",
        ),
        "customize true-cfg range": ([*customize, "--true-cfg-end", "99"], "--true-cfg-start / --true-cfg-end"),
        "edit attention nonsense": (
            [*edit, "--attention", "nonsense"],
            "--attention: unknown attention backend 'nonsense'",
        ),
        "edit size 0x0": ([*edit, "--size", "0x0"], "--size: expected each side at least"),
        "edit two images on kontext": ([*edit, "--image", str(f["garment"])], "at most 1 reference image(s), got 2"),
        "inpaint a reference on fill": ([*inpaint, "--reference", str(f["garment"])], "takes at most 0 reference"),
        "edit with a fill model": ([edit[0], "--model", str(m["fill"]), *edit[3:]], "does not edit"),
        "tryon with a flux model": ([tryon[0], "--model", str(m["flux1"]), *tryon[3:]], "try-on runs on SD1.5 models"),
        "generate lora missing": ([*generate, "--lora", "/nothing/x.safetensors"], "LoRA file not found"),
        "generate lora a text file": ([*generate, "--lora", str(f["text"])], "not a readable safetensors file"),
        "generate missing model": (
            [generate[0], "--model", "/nothing/model", *generate[3:]],
            "--model: /nothing/model",
        ),
        "existing out without overwrite": ([*edit[:-1], str(f["garment"])], "exists; give another name"),
        "prompts file not text": (
            [generate[0], "--model", str(m["flux1"]), "--prompts", str(f["person"]), "--out", str(out)],
            "--prompts: ",
        ),
        "steps not a number": (
            [*edit, "--steps", "abc"],
            "--steps: invalid int value: 'abc' (see diffbase edit --help)",
        ),
        "dtype not a choice": ([*edit, "--dtype", "float64"], "--dtype: invalid choice: 'float64'"),
        "upscale without its input": ([upscale[0], *upscale[2:]], "the following arguments are required: input"),
        "generate prompts into a read-only folder": (
            [generate[0], "--model", str(m["flux1"]), "--prompts", str(f["prompts"]), "--out", str(ro / "batch")],
            "--out: cannot write in",
        ),
        "eval upscale an unreadable original": (
            ["eval", "upscale", "--originals", str(f["broken"]), "--model", str(m["flux1"]), "--out", str(out)],
            "--originals: " + str(f["broken"] / "x.png") + ": not a readable image",
        ),
        "eval upscale into a read-only folder": (
            ["eval", "upscale", "--originals", str(f["originals"]), "--model", str(m["flux1"]), "--out", str(ro)],
            "--out: cannot write in",
        ),
        "generate a model whose model_index.json is not text": (
            [generate[0], "--model", str(f["badmodel"]), *generate[3:]],
            f"error: {f['badmodel'] / 'model_index.json'}: cannot read it (UnicodeDecodeError)",
        ),
        "cache into a read-only folder": (
            ["cache", str(configs_dir() / "experiments/tiny/sd15_lora.yaml"), f"experiment.output_dir={ro / 'run'}"],
            "experiment.output_dir: cannot write in",
        ),
    }


@pytest.fixture(scope="module")
def models(tiny_model) -> dict[str, Path]:
    return {"kontext": tiny_model("flux1-kontext"), "fill": tiny_model("flux1-fill"), "flux1": tiny_model("flux1"),
            "sd15": tiny_model("sd15")}  # fmt: skip


def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffbase.models.folders
    import diffbase.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (diffbase.models.loading, diffbase.models.folders):
        for name in ("load_model", "load_pipeline"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


CASE_IDS = list(cases({k: Path(k) for k in ("person", "garment", "mask", "black", "small_mask", "wide", "pickle",
                                            "checkpoint", "text", "folder", "dreamo", "prompts", "broken",
                                            "originals", "badmodel")},
                      {k: Path(k) for k in ("kontext", "fill", "flux1", "sd15")}, Path("o"), Path("ro")))  # fmt: skip


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_before_loading_and_writes_nothing(
    case: str, files, models, read_only, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    argv, expected = cases(files, models, out, read_only)[case]
    before = {p: p.stat().st_mtime_ns for p in files["person"].parent.rglob("*")}
    no_loading(monkeypatch)
    code, stdout, err = run_cli(*argv)
    assert code == 2, (case, stdout, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not list(out.iterdir()) and not list(read_only.iterdir())
    assert {p: p.stat().st_mtime_ns for p in files["person"].parent.rglob("*")} == before  # inputs untouched


def test_sizes_are_rounded_with_a_note_and_outputs_take_their_suffix(files, models, tmp_path: Path) -> None:
    out = tmp_path / "e.jpg"
    code, _, err = run_cli("edit", "--model", str(models["kontext"]), "--image", str(files["person"]), "--prompt",
                           "red", "--steps", "1", "--size", "31x33", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "note: --size 31x33 is rounded to 32x32 (this model needs multiples of 16 px)" in err
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (32, 32)
    code, _, err = run_cli("edit", "--model", str(models["kontext"]), "--image", str(files["person"]), "--prompt",
                           "red", "--steps", "1", "--size", "32x32", "--out", str(out), "--overwrite")  # fmt: skip
    assert code == 0, err


def test_help_says_each_default_once() -> None:
    from diffbase.cli import build_parser
    from diffbase.interface.options import HelpFormatter

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    formatter = HelpFormatter("diffbase")
    for name in ("generate", "edit", "inpaint", "customize", "upscale", "tryon", "dreamfit"):
        for action in commands[name]._actions:
            text = formatter._get_help_string(action) % {"default": action.default}
            assert text.lower().count("default") <= 1 and "(default: None)" not in text, (name, action.dest, text)
            if action.option_strings and action.dest not in ("help",):
                assert action.help, f"{name} {action.option_strings[0]}: no help text"


def test_an_unreadable_weights_file_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights / --checkpoint / --adapter files a user cannot read (was a PermissionError traceback; safetensors
    called them "not a safetensors file"). chmod cannot stop root, so the read itself fails."""
    import builtins

    from diffbase.errors import UserError
    from diffbase.interface import checks

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"\0" * 16)
    real = builtins.open

    def denied(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file) == str(f):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(UserError, match=r"^--weights: .*w\.safetensors cannot be read \(Permission denied\)$"):
        checks.weights_file(str(tmp_path), "--weights")
