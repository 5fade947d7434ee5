"""Whether long work shows progress bars (with rate and ETA): on a terminal, unless `--quiet`."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def shown() -> bool:
    return not _quiet and sys.stderr.isatty()


def bar(iterable: Iterable[Any], desc: str, unit: str = "step", total: int | None = None) -> Any:
    """A tqdm bar over `iterable`, off when progress is not shown."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not shown(), dynamic_ncols=True)


def pipeline(pipe: Any, desc: str) -> None:
    """A diffusers pipeline's own step bar, on when progress is shown."""
    pipe.set_progress_bar_config(disable=not shown(), desc=desc, unit="step", dynamic_ncols=True)
