"""`logging.report_to` through accelerate's trackers: a W&B offline run and an MLflow file-store run hold the
losses of metrics.jsonl step by step, a run that ends in an error is marked so, and a bad name or a missing
package is one line before anything loads. No network: W&B offline, MLflow's file store in the output folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffbase.config import load_config
from tests.helpers import SHAPES, TINY_EXPERIMENTS, run_cli, train_tiny

FLUX_LORA = next(p for p in TINY_EXPERIMENTS if p.name == "flux1_lora.yaml")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline and silent, its own folders in tmp_path; no MLflow settings from the environment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN",
                 "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")  # recorded, so the value the run sets is undone after
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    return tmp_path / "run"


def wandb_records(out: Path) -> list[dict]:
    """The records of the run's .wandb log, read by wandb's own reader (`wandb leet inspect --json`)."""
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def wandb_history(records: list[dict]) -> dict[int, dict]:
    """Step -> what was logged at it (W&B merges the logs of one step)."""
    rows = [r["history"] for r in records if r["type"] == "history"]
    return {int(row["step"]["num"]): row["item"] for row in rows}


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def mlflow_run(out: Path, experiment: str):
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def by_step(rows: list[dict], name: str) -> dict[int, float]:
    return {r["step"]: r[name] for r in rows if name in r}


def test_wandb_offline_and_mlflow_file_store_hold_the_logged_losses(offline: Path) -> None:
    code, _, err = train_tiny(FLUX_LORA, offline, 3, "logging.report_to=[wandb,mlflow]", "training.validation.every=2",
                              "training.validation.loss_split=0.25")  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
    losses, val_losses = by_step(rows, "loss"), by_step(rows, "val_loss")
    assert sorted(losses) == [1, 2, 3] and sorted(val_losses) == [2, 3]
    assert not (offline / "tensorboard").exists()  # not asked for

    records = wandb_records(offline)
    history = wandb_history(records)
    assert {s: history[s]["loss"] for s in losses} == pytest.approx(losses, rel=1e-6)
    assert {s: history[s]["val_loss"] for s in val_losses} == pytest.approx(val_losses, rel=1e-6)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "tiny_flux1_lora" and run["config"]["update"]["training"]["learning_rate"] == 0.01
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]

    client, run = mlflow_run(offline, "tiny_flux1_lora")
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == pytest.approx(losses, rel=1e-6)
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert logged == pytest.approx(val_losses, rel=1e-6)
    assert run.data.params["training.learning_rate"] == "0.01" and run.info.status == "FINISHED"


def test_a_run_that_fails_is_marked_failed_and_only_the_main_process_logs(offline: Path) -> None:
    from diffbase.training.metrics import MetricsLog

    config = load_config(FLUX_LORA, [f"experiment.output_dir={offline}", "logging.report_to=[wandb,mlflow]",
                                     "logging.project=trackers", "logging.run_name=broken"])  # fmt: skip
    MetricsLog(offline, enabled=False, config=config).close()
    assert not offline.exists()  # another process: no trackers, no files
    metrics = MetricsLog(offline, config=config)
    metrics.scalars(1, loss=0.5)
    metrics.close("failed")
    metrics.close("failed")  # once
    records = wandb_records(offline)
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]
    assert [r["run"]["display_name"] for r in records if r["type"] == "run"] == ["broken"]
    client, run = mlflow_run(offline, "trackers")
    assert run.info.status == "FAILED" and run.info.run_name == "broken"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]


def train_cli(out: Path, *overrides: str) -> tuple[int, str, str]:
    return run_cli("train", str(FLUX_LORA), f"data.train_path={SHAPES}", f"experiment.output_dir={out}", *overrides)


@pytest.mark.parametrize("value", ["[tensorboard,wandbb]", "neptune"])
def test_a_bad_report_to_is_one_line_naming_the_choices(value: str, tmp_path: Path) -> None:
    code, _, err = train_cli(tmp_path / "run", f"logging.report_to={value}")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "logging.report_to" in err
    assert all(name in err for name in ("tensorboard", "wandb", "mlflow"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("tracker", "package"), [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_package_names_what_to_install(
    tracker: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: importlib finds no spec
    code, _, err = train_cli(tmp_path / "run", f"logging.report_to=[{tracker}]")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "logging.report_to" in err and f"pip install {package}" in err
    assert not (tmp_path / "run").exists()
