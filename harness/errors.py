"""User-facing errors: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib
from typing import Iterable


class HarnessError(Exception):
    """An error caused by the user's input; shown as one clear line, never a traceback."""

    exit_code = 2


class UnknownIdError(HarnessError):
    """An id that no registry knows, with close matches in the message."""

    def __init__(self, kind: str, wanted: str, known: Iterable[str]):
        known = sorted(set(known))
        matches = close_matches(wanted, known)
        hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
        listing = f" (see `harness list {kind}s`)"
        super().__init__(f"unknown {kind} {wanted!r}{hint}{listing}")
        self.kind, self.wanted, self.matches = kind, wanted, matches


def close_matches(wanted: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known ids closest to ``wanted`` (difflib ratio >= 0.6)."""
    return difflib.get_close_matches(wanted, list(known), n=n, cutoff=0.6)
