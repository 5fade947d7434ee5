"""What several test files share: running the CLI in-process, the shipped example data, tiny experiment
configs and runs, and small model inputs. Test files import from here (and from images.py and
golden_record.py), never from each other."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffbase.config import Config, configs_dir, load_config

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "flux2-klein"]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from diffbase.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


SHAPES = ROOT / "examples" / "shapes"
EDITS = ROOT / "examples" / "edits" / "metadata.jsonl"
MULTI_REFERENCE = ROOT / "examples" / "dreamo" / "metadata.jsonl"
TINY_EXPERIMENTS = sorted((configs_dir() / "experiments" / "tiny").glob("*.yaml"))


def train_tiny(path: Path, out: Path, steps: int, *overrides: str) -> tuple[int, str, str]:
    """`diffbase train` on a tiny experiment with the shapes (the edit methods: the pairs in
    examples/edits; DreamO: examples/dreamo), no checkpoints, 2 validation steps."""
    method = load_config(path).training.method
    data = EDITS if method in ("kontext", "fill") else MULTI_REFERENCE if method == "dreamo" else SHAPES
    return run_cli(
        "train", str(path), f"training.max_steps={steps}", "training.checkpoint_every=0",
        "training.validation.steps=2", f"data.train_path={data}", f"experiment.output_dir={out}", *overrides,
    )  # fmt: skip


TINY_MODELS = {
    "sd15": "sd15_tiny",
    "sdxl": "sdxl_tiny",
    "sd3": "sd3_tiny",
    "flux1": "flux1_tiny",
    "flux2": "flux2_tiny",
    "flux2-klein": "flux2_klein_tiny",
}


def tiny_config(family: str, folder: Path, data: Path, out: Path, *overrides: str) -> Config:
    return load_config(
        configs_dir() / "models" / f"{TINY_MODELS[family]}.yaml",
        [
            f"model.pretrained_path={folder}",
            f"data.train_path={data}",
            f"experiment.output_dir={out}",
            "data.resolution=64",
            "training.batch_size=4",
            "training.checkpoint_every=0",
            "training.objective.timestep_sampling=uniform",
            *overrides,
        ],
    )


def write_experiment(path: Path, family: str, folder: Path, data: Path, out: Path, *lines: str) -> Path:
    base = configs_dir() / "models" / f"{TINY_MODELS[family]}.yaml"
    path.write_text(
        "\n".join(
            [
                f"_base_: [{base}]",
                "experiment: {output_dir: " + str(out) + "}",
                "model: {pretrained_path: " + str(folder) + "}",
                "data: {train_path: " + str(data) + ", resolution: 64}",
                "training: {batch_size: 2, max_steps: 6, checkpoint_every: 2, learning_rate: 1.0e-3}",
                *lines,
            ]
        )
        + "\n"
    )
    return path


def transformer_inputs(transformer, seed: int, tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    side = int(tokens**0.5)
    img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return {
        "hidden_states": torch.randn(1, tokens, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.cat([torch.zeros(tokens, 1), img_ids.float()], dim=1),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def dreamfit_checkpoint(tiny_model, tmp_path):
    from diffbase.methods.dreamfit.mechanism.checkpoint import Dims, random_official, save_official
    from diffbase.models.loading import load_pipeline

    pipe, _ = load_pipeline(tiny_model("flux1"))
    return save_official(random_official(Dims.of(pipe.transformer), rank=4, seed=3), tmp_path / "flux_tryon.bin")


def dreamfit_config(tiny_model, tmp_path, *extra: str, pairs: int = 4):
    """DreamFit on the tiny FLUX.1 at 32x32, rank 4, batch 2, on `pairs` synthetic try-on pairs."""
    from diffbase.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "synth", pairs, 0, size=(32, 32))
    return load_config(
        configs_dir() / "models" / "flux1_tiny.yaml",
        [
            f"model.pretrained_path={tiny_model('flux1')}",
            f"data.train_path={root}",
            "training.method=dreamfit",
            "training.dreamfit.size=[32,32]",
            "training.dreamfit.rank=4",
            "training.batch_size=2",
            "training.checkpoint_every=0",
            f"experiment.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def first_transformer_call(pipe, **kwargs) -> dict:
    """The keyword arguments and output of the pipeline's first transformer call."""
    seen: dict = {}

    def hook(module, args, call_kwargs, out):  # noqa: ANN001
        seen.setdefault("kwargs", call_kwargs)
        seen.setdefault("out", out[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a red shirt", num_inference_steps=1, height=32, width=32, max_sequence_length=32,
         generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    handle.remove()
    return seen


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `folder` with mount `options` (a small disk, a read-only one), unmounted after; the
    test is skipped where this machine cannot mount one (mounting needs root)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small or read-only filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def dreamo_embeddings(pipe, seed: int = 0):
    """DreamO embeddings for a pipeline, filled with a seed's noise."""
    from diffbase.methods.dreamo.mechanism.conditions import DreamOEmbeddings

    emb = DreamOEmbeddings.for_pipe(pipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return emb


def peft_lora(pipe, seed: int = 0) -> tuple[dict, dict]:
    """A random LoRA over the official layers on a copy of the transformer: (peft state with the
    `transformer.` prefix, scales)."""
    import copy

    from peft.utils import get_peft_model_state_dict

    from diffbase.methods.dreamo.mechanism.files import lora_modules
    from diffbase.methods.lora import LoraConfig, add_lora
    from diffbase.models.lora_formats import peft_scales

    t = copy.deepcopy(pipe.transformer)
    add_lora(t, "flux1", LoraConfig(rank=2, alpha=4, target_modules=lora_modules(t)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(t).items()}
    return state, peft_scales(t, "transformer")


def write_dreamo_folder(pipe, folder: Path) -> None:
    """A DreamO folder (dreamo.safetensors) with a random LoRA and embeddings for this pipeline."""
    from diffbase.methods.dreamo.mechanism.files import write_dreamo_file

    state, scales = peft_lora(pipe)
    emb = dreamo_embeddings(pipe)
    write_dreamo_file(folder / "dreamo.safetensors", state, scales,
                      {"t5": emb.t5.weight.detach(), "task": emb.task.weight.detach(), "idx": emb.idx.weight.detach()})  # fmt: skip


def tiny_dino(folder: Path) -> Path:
    """A random-weight DINOv2 folder (model and image processor), built locally: the feature network's plumbing."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                          image_size=28, patch_size=14)  # fmt: skip
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)  # fmt: skip
    return folder


def tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP folder (model, image processor, tiny tokenizer), built locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffbase.models.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok),
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder


FACE_CELL = 32  # the tiny face detector's grid: it looks at the stride-32 cells of its 640x640 input


def tiny_face_pack(folder: Path, embed: int = 16) -> Path:
    """An insightface model pack built locally with onnx.helper: a detector that insightface's model router takes
    for SCRFD (9 outputs: scores, boxes and 5 landmarks at strides 8, 16 and 32, 2 anchors) and a random-weight
    recognizer it takes for ArcFace (one 112x112 input, one output). The detector finds a face at each 32x32 cell of
    its grid that is pure blue (the marker, see draw_face), with a box and ArcFace-template landmarks centred on the
    cell whose size the cell's green value sets (see face_landmarks), so a test knows where every face is."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    template = face_template()
    nodes, weights, outputs = [], [], []

    def const(name: str, array, dtype=np.float32) -> str:
        weights.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    # After insightface's (x - 127.5) / 128 on RGB, a stride-32 cell's mean: B near 1 marks a face, G in [-1, 1] its
    # size g: box half-size and landmarks' scale 32 * (1.5 + g), both in units of the stride (SCRFD's distances).
    for stride in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{stride}"], kernel_shape=[stride] * 2,
                                      strides=[stride] * 2, name=f"pool{stride}"))  # fmt: skip
    for head, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            w, b = np.zeros((2 * width, 3, 1, 1)), np.zeros(2 * width)
            if head == "score":
                b[:] = -20.0  # no face: sigmoid(-20)
                if stride == FACE_CELL:
                    w[0, 2, 0, 0], b[0] = 20.0, -16.0  # anchor 0: sigmoid(20 * (B - 0.8))
            elif stride == FACE_CELL:
                for anchor in range(2):
                    if head == "bbox":  # left, top, right, bottom from the cell's corner: a box centred on the cell
                        w[4 * anchor : 4 * anchor + 4, 1, 0, 0] = 1.0
                        b[4 * anchor : 4 * anchor + 4] = [1.0, 1.0, 2.0, 2.0]
                    else:
                        w[10 * anchor : 10 * anchor + 10, 1, 0, 0] = template.reshape(-1)
                        b[10 * anchor : 10 * anchor + 10] = 0.5 + 1.5 * template.reshape(-1)
            name = f"{head}{stride}"
            nodes.append(helper.make_node("Conv", [f"pool{stride}", const(f"{name}.w", w), const(f"{name}.b", b)],
                                          [f"{name}.conv"], name=f"{name}.conv"))  # fmt: skip
            last = f"{name}.conv"
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"{name}.sig"], name=f"{name}.sig"))
                last = f"{name}.sig"
            nodes.append(helper.make_node("Transpose", [last], [f"{name}.t"], perm=[0, 2, 3, 1], name=f"{name}.t"))
            nodes.append(helper.make_node("Reshape", [f"{name}.t", const(f"{name}.shape", [-1, width], np.int64)],
                                          [name], name=f"{name}.reshape"))  # fmt: skip
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{stride}", width]))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    save_onnx(helper.make_graph(nodes, "tiny_scrfd", [image], outputs, weights), folder / "det_tiny.onnx")

    rng = np.random.default_rng(0)
    conv = rng.normal(0, 1 / np.sqrt(3 * 64), (8, 3, 8, 8))
    fc = rng.normal(0, 1 / np.sqrt(8 * 14 * 14), (8 * 14 * 14, embed))
    weights = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
               (("conv.w", conv), ("conv.b", rng.normal(0, 0.1, 8)), ("fc.w", fc), ("fc.b", rng.normal(0, 0.1, embed)))]  # fmt: skip
    nodes = [helper.make_node("Conv", ["data", "conv.w", "conv.b"], ["h"], strides=[8, 8], name="conv"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["fc1"], name="fc")]  # fmt: skip
    crops = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])
    embedding = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", embed])
    save_onnx(helper.make_graph(nodes, "tiny_arcface", [crops], [embedding], weights), folder / "w600k_tiny.onnx")
    return folder


def save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime reads it whatever its age
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def face_template():
    """The toy detector's 5 landmarks around a face's centre, in half-sizes: insightface's ArcFace template rounded
    to 1/64, so that with a green g = (2 * green - 255) / 256 every landmark is exact in float32 (the detector's
    arithmetic) and a test can align the very crops insightface aligns."""
    import numpy as np
    from insightface.utils.face_align import arcface_dst

    return np.round((arcface_dst.astype(np.float64) - 56) / 56 * 64) / 64


def face_landmarks(row: int, col: int, green: int):
    """Where the tiny detector puts the 5 landmarks of the face whose marker is cell (row, col) with that green:
    face_template around the cell's centre, scaled to the half-size 32 * (1.5 + g)."""
    import numpy as np

    half = FACE_CELL * (1.5 + (green - 127.5) / 128)
    centre = np.array([FACE_CELL * col + FACE_CELL / 2, FACE_CELL * row + FACE_CELL / 2])
    return (centre + half * face_template()).astype(np.float32)  # exact; float32 as the detector gives them


def draw_face(image, row: int, col: int, green: int, seed: int) -> None:
    """Draw into an RGB uint8 array a 'face' for tiny_face_pack: a random texture (the identity, by seed) filling
    the box the detector will report, blue kept below its threshold, and the marker cell (row, col): blue 255,
    green `green` (the size)."""
    import numpy as np
    from PIL import Image

    half = FACE_CELL * (1.5 + (green - 127.5) / 128)
    cx, cy = FACE_CELL * col + FACE_CELL / 2, FACE_CELL * row + FACE_CELL / 2
    x0, y0, side = round(cx - half), round(cy - half), round(2 * half)
    texture = np.random.default_rng(seed).integers(0, 256, (12, 12, 3)).astype(np.uint8)
    texture[..., 2] //= 2  # blue < 128: only markers fire
    patch = np.asarray(Image.fromarray(texture).resize((side, side), Image.BILINEAR))
    image[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side] = patch[max(-y0, 0) :, max(-x0, 0) :][
        : image.shape[0] - max(y0, 0), : image.shape[1] - max(x0, 0)
    ]
    image[FACE_CELL * row : FACE_CELL * (row + 1), FACE_CELL * col : FACE_CELL * (col + 1)] = (0, green, 255)


def free_port() -> int:
    """A loopback port nobody listens on now (for a test server or a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_runs(launcher: list[str], runs: tuple[list[str], ...], timeout: int, what: str) -> str:
    """`diffbase train` with each run's arguments, one after the other in the same processes (one start-up):
    `python -m <launcher...> -m tests.train_runs`. A launch that does not finish is killed with its workers (a
    collective that never completes); a failure shows a worker's own traceback. Returns what the processes printed."""
    import signal
    import sys

    args = [a for run in runs for a in ("--", *run)][1:]
    cmd = [sys.executable, "-m", *launcher, "-m", "tests.train_runs", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the workers too, not only the launcher
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"{what} did not finish in {timeout} s: {err[-3000:]}") from None
    first = err.find("]: Traceback")  # a worker's own, else the launcher's
    first = first if first >= 0 else err.find("Traceback")
    assert proc.returncode == 0, err[first : first + 5000] if first >= 0 else err[-3000:]
    return out


def checkpoint_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained tensors of a run's checkpoint, by file and key (the fp32 weights, whatever the export's dtype)."""
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step-{step:06d}"
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) if f.stem != "rng"
            for k, v in load_file(str(f)).items()}  # fmt: skip


def logged(run: Path, key: str) -> list[float]:
    """Every value of `key` in a run's metrics.jsonl, in order."""
    import json

    return [row[key] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in row]
