"""One error type for every bad input, so command lines print one clear line, never a traceback."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable


class TedFlError(Exception):
    """A user-facing problem: the message names the file, site or key and says how to fix it."""


def exit_code(body: Callable[[], int | None]) -> int:
    """Run a command line's body: a TedFlError becomes one line on stderr and exit status 2."""
    try:
        return int(body() or 0)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str], where: str = "") -> TedFlError:
    """Build the standard 'unknown X' error with a suggestion and the valid choices."""
    choices = sorted(choices)
    place = f" in {where}" if where else ""
    return TedFlError(
        f"unknown {kind} '{name}'{place}{closest(name, choices)}; valid: {', '.join(choices)}"
    )
