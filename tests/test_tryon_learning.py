"""Try-on training on the embedded default learns: the held-out masked-region error falls clearly."""

from __future__ import annotations

from pathlib import Path

from diffbase.config import configs_dir, load_config
from diffbase.data.synthetic import write_dataset
from diffbase.demo import eval_set, run_tryon, score, toy_model
from diffbase.methods import train
from diffbase.methods.tryon.mechanism.sampling import TryOnSettings


def test_training_lowers_the_masked_error_on_held_out_people_and_garments(tmp_path: Path) -> None:
    model = toy_model()
    write_dataset(tmp_path / "data", 160, 0, size=(32, 32))
    config = load_config(
        configs_dir() / "experiments" / "demo" / "tryon.yaml",
        [
            f"model.pretrained_path={model}",
            f"data.train_path={tmp_path / 'data'}",
            f"experiment.output_dir={tmp_path / 'run'}",
            "training.max_steps=200",
            "training.batch_size=8",
            "training.checkpoint_every=0",
            "training.schedule.warmup_steps=10",
        ],
    )
    data = eval_set(12)
    settings = TryOnSettings(steps=12, guidance=2.5, eta=1.0, seed=0)
    before = score(run_tryon(model, None, data, settings), data)
    result = train(config, show_progress=False)
    after = score(run_tryon(model, tmp_path / "run" / "vton", data, settings), data)
    assert result.finished
    assert after["masked_l1"] < 0.85 * before["masked_l1"], (before, after)
