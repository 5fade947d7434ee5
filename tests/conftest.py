"""Shared fixtures: tiny diffusers folders written once per test session by `zoo tiny`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import diffbase.methods

diffbase.methods.load_all()  # registers the methods and their config sections

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)


# Test tiers, by file (every file not named here is `unit`): `make check` runs the unit tier (about a minute
# on 2 cores), `make test` all three. Times are the files' share of the suite on 2 cores (2026-12-07).
TIERS = {
    "tiny": {  # tiny models trained for a few steps: the engine, the experiments, the golden record
        "test_training.py",
        "test_hot_path.py",
        "test_bf16.py",
        "test_behaviour_kept.py",
        "test_edit_training.py",
        "test_experiments.py",
        "test_cache.py",
        "test_toy_pretrain.py",
        "test_dreamfit_memory.py",
        "test_dreamfit_partial.py",
        "test_file_modes.py",
        "test_method_seam.py",
        "test_method_package.py",
        "test_quantize.py",
        "test_families.py",
        "test_plan.py",
        "test_slots.py",
        "test_gpu_benchmark.py",
        "test_offload.py",
        "test_block_swap.py",
        "test_ema.py",
        "test_optimizers.py",
        "test_captions.py",
        "test_adapters.py",
        "test_trainer_runs.py",
        "test_metrics.py",
        "test_lpips.py",
        "test_compile.py",
        "test_control_types.py",
        "test_trackers.py",
        "test_resolutions.py",
        "test_preprocess_models.py",
        "test_sharded.py",
    },
    "learning": {  # something learns, or the whole program runs end to end (processes, a browser, faults)
        "test_faults.py",
        "test_dreamfit_learning.py",
        "test_tryon_learning.py",
        "test_web_ui.py",
        "test_distributed.py",
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = Path(str(item.fspath)).name
        tier = next((t for t, files in TIERS.items() if name in files), "unit")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def tiny_model(zoo_dir: Path):
    """tiny_model("flux1") -> path of a tiny diffusers folder for that family (built once)."""
    from diffbase.models.zoo import write_tiny

    def get(family: str) -> Path:
        out = zoo_dir / family
        if not out.exists():
            write_tiny(family, out)
        return out

    return get
