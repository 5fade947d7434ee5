"""The CLI's shape: fast help (no heavy imports), info, and zoo errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffbase.config import configs_dir
from tests.helpers import run_cli


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from diffbase.cli import build_parser; build_parser().format_help(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"--help imported {out}"


def test_help_lists_commands() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("config", "zoo", "info", "generate", "demo"):
        assert command in out


def test_info_counts_real_sd15_from_config_without_weights() -> None:
    code, out, err = run_cli("info", str(configs_dir() / "models/sd15.yaml"))
    assert code == 0, err
    assert "859,520,964" in out  # SD1.5 UNet
    assert "123,060,480" in out  # CLIP-L text encoder


def test_info_counts_flux1_dev_transformer() -> None:
    code, out, _ = run_cli("info", str(configs_dir() / "models/flux1_dev.yaml"))
    assert code == 0
    assert "11.90B" in out


def test_info_on_a_folder_matches_the_loaded_model(tiny_model) -> None:
    import torch

    from diffbase.models.loading import load_pipeline

    folder = tiny_model("flux1")
    code, out, _ = run_cli("info", str(folder))
    pipe, _ = load_pipeline(folder)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    assert code == 0 and f"({n:,})" in out
    assert isinstance(pipe.transformer, torch.nn.Module)


def test_zoo_unknown_family_and_nonempty_output(tmp_path: Path) -> None:
    code, _, err = run_cli("zoo", "tiny", "flux3", str(tmp_path / "x"))
    assert code == 2 and "unknown family 'flux3'" in err and "did you mean 'flux" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    code, _, err = run_cli("zoo", "tiny", "sd15", str(tmp_path / "full"))
    assert code == 2 and "not empty" in err


def test_zoo_writes_a_complete_folder(tmp_path: Path) -> None:
    out = tmp_path / "sd15"
    code, stdout, err = run_cli("zoo", "tiny", "sd15", str(out))
    assert code == 0, err
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"):
        assert (out / name).exists(), name
    assert not list(tmp_path.glob(".sd15.*"))  # no temporary folder left behind


def test_a_run_leaves_nothing_after_a_config_error_and_never_overwrites_silently(tmp_path) -> None:
    from tests.helpers import SHAPES

    out = tmp_path / "run"
    exp = "configs/experiments/tiny/sd15_lora.yaml"
    common = ["training.max_steps=1", "training.validation.steps=2", f"experiment.output_dir={out}"]
    code, _, err = run_cli("train", exp, *common, f"data.train_path={tmp_path / 'missing'}")
    assert code == 2 and "not found" in err and not out.exists()  # no config.yaml left behind
    assert run_cli("train", exp, *common, f"data.train_path={SHAPES}")[0] == 0
    first = (out / "metrics.jsonl").read_text()
    code, _, err = run_cli("train", exp, *common, f"data.train_path={SHAPES}")
    assert code == 2 and "already holds a run" in err and "--resume latest" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == first  # untouched
    code, _, err = run_cli("train", exp, *common, f"data.train_path={SHAPES}", "training.max_steps=2", "--overwrite")
    assert code == 0, err
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line
    ] == [1, 2]


def test_generate_records_the_guidance_it_used(tiny_model, tmp_path) -> None:
    from PIL import Image

    code, _, err = run_cli("generate", "--model", str(tiny_model("sd15")), "--prompt", "a cat", "--size", "32x32",
                           "--steps", "2", "--out", str(tmp_path / "a.png"))  # fmt: skip
    assert code == 0, err
    info = Image.open(tmp_path / "a.png").text
    assert json.loads(info["diffbase"])["guidance"] == 7.5  # StableDiffusionPipeline's default
    assert info["parameters"].startswith("a cat\n")


def test_a_relative_output_folder_is_not_a_new_top_level_one_from_the_root(monkeypatch) -> None:
    """From / (a container's WORKDIR), `--out outputs/x` is a folder under the working one: never refused as a
    typo'd top-level folder (an absolute /no-such-folder/x still is)."""
    from diffbase.errors import UserError
    from diffbase.io import writable_folder

    monkeypatch.chdir("/")
    try:
        writable_folder("diffbase-no-such-folder/x", "--out")
    except UserError as err:  # a user who cannot write in / is told so, which is right
        assert "filesystem's root" not in str(err) and "cannot write in /" in str(err), err
    with pytest.raises(UserError, match="filesystem's root"):
        writable_folder("/diffbase-no-such-folder/x", "--out")


def test_output_folders_are_checked_before_the_work_and_train_shows_no_bar_off_a_terminal(tmp_path: Path) -> None:
    from diffbase.config import load_config
    from diffbase.training.validation import check_size
    from tests.helpers import SHAPES

    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    for argv, flag in ((["zoo", "tiny", "sd15", str(in_the_way)], "out_dir"), (["parity", "--out", str(in_the_way)],
                       "--out"), (["zoo", "pretrain", "sd15-toy", str(in_the_way)], "out")):  # fmt: skip
        code, _, err = run_cli(*argv)  # were tracebacks (NotADirectoryError), parity after minutes of work
        assert code == 2 and err == f"error: {flag}: {in_the_way} is a file; expected a folder\n", err
    code, _, err = run_cli("zoo", "pretrain", "sd15-toy", str(tmp_path / "m"), "--unet-steps", "-1")
    assert code == 2 and err.startswith("error: --unet-steps: expected a whole number at least 0"), err
    exp, out = str(configs_dir() / "experiments/tiny/sd15_lora.yaml"), tmp_path / "run"
    common = [f"data.train_path={SHAPES}", f"experiment.output_dir={out}", "training.checkpoint_every=0"]
    code, _, err = run_cli("train", exp, *common, "training.validation.size=[33,33]")
    assert code == 2 and "training.validation.size: expected [height, width], each a multiple of 8 px" in err, err
    assert not out.exists()  # was a traceback after the steps were trained
    flux = load_config(configs_dir() / "experiments/tiny/flux1_lora.yaml", ["training.validation.size=[40,56]"])
    check_size(flux)  # FLUX pipelines round such a size down (diffusers warns): accepted as before
    code, _, err = run_cli("train", exp, *common, "training.max_steps=1", "training.validation.steps=1")
    assert code == 0 and "step/s" not in err and "train lora" not in err, err  # the bar showed with --quiet too


def test_a_prompts_file_that_cannot_be_read_is_one_line(tiny_model, tmp_path: Path, monkeypatch) -> None:
    prompts, real = tmp_path / "prompts.txt", Path.read_text
    prompts.write_text("a cat\n")

    def denied(self: Path, *args, **kwargs) -> str:  # chmod 000 cannot stop root, the suite's user in CI
        if self == prompts:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    common = ["--model", str(tiny_model("sd15")), "--size", "32x32", "--out", str(tmp_path / "out")]
    code, _, err = run_cli("generate", "--prompts", str(prompts), *common)  # was a PermissionError traceback
    assert code == 2 and err == f"error: --prompts: cannot read {prompts} (Permission denied)\n", err
    code, _, err = run_cli("generate", "--prompts", str(tmp_path), *common)
    assert code == 2 and err.startswith(f"error: --prompts: {tmp_path} is a folder; expected a text file"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]
