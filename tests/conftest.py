"""Shared fixtures: tiny diffusers folders written once per test session by `zoo tiny`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import diffbase.methods  # noqa: E402,F401  (registers the built-in methods and their config sections)

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)



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
