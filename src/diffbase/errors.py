"""User-facing errors: one line, names the file or key, exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user. The CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ` (did you mean 'x'?)` hint for a typo, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type's name when it has no message), cut to `limit` characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class Stopped(Exception):
    """A run that stopped on request (SIGTERM, SIGINT) after saving a checkpoint. The CLI prints the
    message, which says where to resume from, and exits with `exit_code` (143 or 130, as a shell would)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
