"""Progress of long work: bars (rate and ETA) on a terminal unless `--quiet`, and the one place where work
can be stopped from outside. Every sampling loop steps a `Bar` (ours directly, diffusers' pipelines through
`pipeline`), and each step asks `check()` whether to go on: the web UI stops a request that was cancelled or
ran past its time limit there, with the model lock released and nothing half done."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

from diffbase.errors import UserError

_quiet = False
_stop: Callable[[], str | None] | None = None


class Cancelled(UserError):
    """Work stopped between two steps, on request or at a time limit."""


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def shown() -> bool:
    return not _quiet and sys.stderr.isatty()


@contextlib.contextmanager
def stop_when(reason: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, every step asks `reason()`; a text stops the work with that text (Cancelled)."""
    global _stop
    previous, _stop = _stop, reason
    try:
        yield
    finally:
        _stop = previous


def check() -> None:
    if _stop is not None:
        why = _stop()
        if why:
            raise Cancelled(why)


class Bar(tqdm):
    """A tqdm bar whose every step first asks `check()`."""

    def update(self, n: float | None = 1) -> bool | None:
        check()
        return super().update(n)

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            check()
            yield item


def bar(iterable: Iterable[Any] | None = None, desc: str = "", unit: str = "step", total: int | None = None,
        show: bool | None = None) -> Bar:  # fmt: skip
    """A step bar, shown when progress is (or as `show` says)."""
    visible = shown() if show is None else show
    return Bar(iterable, desc=desc, unit=unit, total=total, disable=not visible, dynamic_ncols=True)


def pipeline(pipe: Any, desc: str, show: bool | None = None) -> None:
    """A diffusers pipeline's own step bar made a `Bar` (shown when progress is), so its steps can be stopped."""

    def progress_bar(iterable: Iterable[Any] | None = None, total: int | None = None) -> Bar:
        return bar(iterable, desc=desc, total=total, show=show)

    pipe.progress_bar = progress_bar
