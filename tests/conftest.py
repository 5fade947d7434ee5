"""Shared fixtures: tiny diffusers folders written once per test session by `zoo tiny`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import diffbase.methods  # noqa: E402,F401  (registers the built-in methods and their config sections)

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

FAMILIES = ["sd15", "sdxl", "sd3", "flux1", "flux2", "flux2-klein"]


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
