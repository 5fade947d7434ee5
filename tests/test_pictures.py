"""Pictures people read: grid captions wrap instead of being cut, in a real font; loss plots come from
matplotlib with a readable legend."""

from __future__ import annotations

from PIL import Image

from diffbase.grid import font, image_grid, wrap
from diffbase.plot import line_plot


def test_long_captions_wrap_within_their_column() -> None:
    face = font()
    text = "a woman wearing a red striped shirt in a park at noon"
    lines = wrap(text, 120, face)
    assert len(lines) > 1 and " ".join(lines) == text and all(face.getlength(line) <= 120 for line in lines)
    assert wrap("supercalifragilisticexpialidocious", 40, face)[0] != "supercalifragilisticexpialidocious"
    cells = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    short = image_grid([cells], header=["a", "b"], cell=128)
    tall = image_grid([cells], header=[text, "a red square on white"], cell=128)
    assert tall.height > short.height  # room for every line of the header, nothing cut
    assert tall.width == short.width == 256


def test_loss_plot_is_drawn_by_matplotlib() -> None:
    image = line_plot({"loss": [(1, 1.0), (2, 0.8), (3, 0.7)], "val_loss": [(3, 0.9)]}, title="loss by step")
    assert image.size == (640, 360) and image.mode == "RGB"
    colours = {image.getpixel((x, y)) for x in range(0, 640, 4) for y in range(0, 360, 4)}
    assert len(colours) > 20  # lines, legend, labels: not a blank canvas
    assert line_plot({}, title="empty").size == (640, 360)


def test_generate_compare_shows_each_prompt_without_and_with_the_lora(tiny_model, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from tests.helpers import TINY_EXPERIMENTS, run_cli, train_tiny

    path = next(p for p in TINY_EXPERIMENTS if p.stem == "flux1_lora")  # a LoRA for the tiny FLUX.1's layers
    code, _, err = train_tiny(path, tmp_path / "run", 2, "training.learning_rate=0.5")
    assert code == 0, err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on white\na blue circle on gray\n")
    grid, lora = tmp_path / "compare.png", tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    base = ["generate", "--model", str(tiny_model("flux1")), "--steps", "2", "--size", "32x32"]
    code, _, err = run_cli(*base, "--prompts", str(prompts), "--out", str(tmp_path / "imgs"), "--compare", str(grid),
                           "--lora", str(lora))  # fmt: skip
    assert code == 0, err
    image = np.asarray(Image.open(grid).convert("RGB"))
    assert image.shape[0] > 2 * 192 and image.shape[1] > 2 * 192  # a row per prompt, a label and two columns
    code, _, err = run_cli(*base, "--prompt", "x", "--out", str(tmp_path / "x.png"), "--compare", str(grid))
    assert code == 2 and "--compare" in err and not (tmp_path / "x.png").exists()
