"""The method seam: a method defined here, outside the package, registers, trains through the one loop
(its config section validated like every other key, its loss terms logged) and exports; and the
training package, the method packages, cli.py and serve.py stay readable (no function over 60 lines)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffbase.config import load_config
from diffbase.methods import METHODS, Method, Trained, get, register, text_to_image, train
from tests.helpers import SHAPES, run_cli

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BiasConfig:
    """`training.bias_only.*`: train only the denoiser's biases, scaled by `scale` in the loss."""

    scale: float = 1.0


def prepare(bb, config) -> Trained:  # noqa: ANN001
    text_to_image.freeze(bb)
    biases = [p for n, p in bb.denoiser.named_parameters() if n.endswith(".bias")]
    for p in biases:
        p.requires_grad_(True)
    return Trained({"denoiser": bb.denoiser}, biases, state_dict=bias_state)


def bias_state(trained: Trained, full=None) -> dict:  # noqa: ANN001
    module = trained.modules["denoiser"]
    return {"denoiser": {n: p.detach() for n, p in module.named_parameters() if n.endswith(".bias")}}


def loss(config, bb, trained, batch, cache, step):  # noqa: ANN001, ANN201
    value, _ = text_to_image.loss(config, bb, trained, batch, cache, step)
    scaled = value * config.training.bias_only.scale
    return scaled, {"unscaled": value.detach(), "bias_norm": torch.stack([p.norm() for p in trained.trainable]).sum()}


def export(config, bb, trained, out_dir: Path) -> dict:  # noqa: ANN001
    path = out_dir / "bias" / "biases.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bias_state(trained)["denoiser"].items()}, str(path))
    return {"biases": str(path)}


def test_a_method_from_outside_the_package_trains_and_exports(tmp_path: Path) -> None:
    if "bias_only" not in METHODS:
        register(
            Method(
                name="bias_only", prepare=prepare, loss=loss, export=export, dataset=text_to_image.dataset,
                validate=text_to_image.validate, section=("bias_only", BiasConfig),
            )
        )  # fmt: skip
    base = ROOT / "configs" / "experiments" / "tiny" / "sd15_lora.yaml"
    overrides = [
        "training.method=bias_only", "training.bias_only.scale=2.0", "training.max_steps=3",
        "training.checkpoint_every=2", f"data.train_path={SHAPES}", f"experiment.output_dir={tmp_path}",
        "training.validation.steps=2",
    ]  # fmt: skip
    config = load_config(base, overrides)
    assert config.training.bias_only.scale == 2.0 and get("bias_only").name == "bias_only"
    before = {n: p.detach().clone() for n, p in _denoiser_biases(config)}
    result = train(config, show_progress=False)
    assert result.finished and result.steps == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(abs(r["loss"] - 2.0 * r["unscaled"]) < 1e-5 for r in steps)  # its own terms
    saved = load_file(json.loads((tmp_path / "exports.json").read_text())["biases"])
    assert set(saved) == set(before) and any(not torch.equal(saved[n], before[n]) for n in before)
    assert (tmp_path / "checkpoints" / "step-000002").is_dir()  # checkpointed by the method's state_dict
    code, _, err = run_cli("train", str(base), *overrides[:1], "training.bias_only.scael=1")
    assert code == 2 and "training.bias_only.scael: unknown key (did you mean 'scale'" in err


def _denoiser_biases(config):  # noqa: ANN001, ANN202
    from diffbase.models.build import build_pipeline

    return [(n, p) for n, p in build_pipeline(config.model, seed=config.experiment.seed).unet.named_parameters()
            if n.endswith(".bias")]  # fmt: skip


def test_an_unknown_method_names_the_closest() -> None:
    code, _, err = run_cli(
        "config", "show", str(ROOT / "configs" / "experiments" / "tiny" / "sd15_lora.yaml"), "training.method=lorra"
    )
    assert code == 2 and "training.method: expected one of" in err and "did you mean 'lora'" in err


def test_no_function_in_the_loop_the_methods_or_the_front_ends_is_over_60_lines() -> None:
    src = ROOT / "src" / "diffbase"
    files = [src / "cli.py", src / "serve.py", *(src / "training").glob("*.py"), *(src / "methods").rglob("*.py"),
             *(src / "interface").glob("*.py")]  # fmt: skip
    long = []
    for file in sorted(files):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{file.name}:{node.name}")
    assert not long
