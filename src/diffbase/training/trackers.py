"""Where the training metrics go besides metrics.jsonl: TensorBoard, W&B and MLflow (`logging.report_to`),
through accelerate's tracker classes. They are checked before anything loads, so a missing package is one
line rather than a crash after the model loaded, and only the process that writes metrics starts them."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from diffbase.config import TRACKERS, Config, dotted, to_dict
from diffbase.errors import UserError

# The module each tracker imports, and the pip package that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}  # fmt: skip
# What a tracker says went wrong when it does not start.
HINTS = {
    "wandb": "log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline",
    "mlflow": "check logging.mlflow_tracking_uri (or MLFLOW_TRACKING_URI)",
    "tensorboard": "check that experiment.output_dir is writable",
}
Outcome = Literal["finished", "failed", "killed"]


def check_trackers(config: Config) -> None:
    """Before the output folder is claimed or the model loads: known tracker names, each one installed."""
    for name in config.logging.report_to:
        if name not in PACKAGES:
            raise UserError(f"logging.report_to: expected a list of {', '.join(TRACKERS)}, got {name!r}")
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"logging.report_to: {name} is not installed; pip install {package} (or drop {name})")


def project(config: Config) -> str:
    return config.logging.project or config.experiment.name


def mlflow_uri(config: Config) -> str:
    """logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a file store in the output folder: given
    no URI, MLflow 3 would use a sqlite database in the working directory (which needs SQLAlchemy)."""
    uri = config.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or (Path(config.experiment.output_dir) / "mlruns").resolve().as_uri()


def make_tensorboard(out_dir: Path, resume_step: int) -> Any:
    """OUTPUT_DIR/tensorboard; a resumed run drops the events logged after its checkpoint."""
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tensorboard", str(out_dir), purge_step=resume_step + 1)


def make_wandb(config: Config, out_dir: Path) -> Any:
    """A W&B run whose files are under OUTPUT_DIR/wandb; WANDB_MODE (offline, disabled) is wandb's own."""
    from accelerate.tracking import WandBTracker

    return WandBTracker(project(config), name=config.logging.run_name, dir=str(out_dir), config=to_dict(config))


def make_mlflow(config: Config) -> Any:
    """An MLflow run in experiment `project`. MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is
    set (it prefers a database); the default store here is one, so it is allowed unless the user says no."""
    import mlflow
    from accelerate.tracking import MLflowTracker

    uri = mlflow_uri(config)
    if urlparse(uri).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return MLflowTracker(project(config), run_name=config.logging.run_name)


def start(name: str, config: Config | None, out_dir: Path, resume_step: int) -> Any:
    """One tracker started, the run's config stored as its parameters (W&B's at init; TensorBoard's
    hparams would be a run of their own, and config.yaml sits beside it)."""
    made = {"tensorboard": lambda: make_tensorboard(out_dir, resume_step),
            "wandb": lambda: make_wandb(config, out_dir), "mlflow": lambda: make_mlflow(config)}  # fmt: skip
    try:
        tracker = made[name]()
        tracker.start()
    except Exception as exc:  # a login, a server or a folder: one line that says which, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"logging.report_to: {name} did not start ({type(exc).__name__}: {first}); "
                        f"{HINTS[name]}") from exc  # fmt: skip
    if name == "mlflow":
        tracker.store_init_configuration(dotted(to_dict(config)))
    return tracker


def start_trackers(config: Config | None, out_dir: Path, resume_step: int) -> list[Any]:
    """The trackers of `logging.report_to`, started (without a config: TensorBoard where installed). If one
    fails to start, those already started are ended first."""
    if config is not None:
        names = config.logging.report_to
    else:  # as before logging.report_to existed
        names = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    started: list[Any] = []
    try:
        for name in names:
            started.append(start(name, config, out_dir, resume_step))
    except BaseException:
        finish_all(started, "failed")
        raise
    return started


def log_image(tracker: Any, tag: str, image: Any, step: int) -> None:
    """A validation image (PIL) at `step`, in the form each tracker takes."""
    import numpy as np

    rgb = image.convert("RGB")
    if tracker.name == "tensorboard":
        tracker.log_images({tag: np.asarray(rgb)[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        tracker.log_images({tag: [rgb]}, step=step)
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(rgb, key=tag, step=step)


def finish(tracker: Any, outcome: Outcome) -> None:
    """End the tracker's run, marked failed (or, for MLflow, killed) where the run did not finish."""
    if outcome != "finished" and tracker.name == "wandb":
        tracker.run.finish(exit_code=1)
    elif outcome != "finished" and tracker.name == "mlflow":
        import mlflow

        mlflow.end_run(status=outcome.upper())
    else:
        tracker.finish()


def finish_all(trackers: list[Any], outcome: Outcome) -> None:
    """Every tracker ended; one that fails to is a warning, so the others (and the run's own error) go on."""
    for tracker in trackers:
        try:
            finish(tracker, outcome)
        except Exception as exc:
            print(f"warning: logging.report_to: {tracker.name} did not end cleanly ({exc})", file=sys.stderr)
