"""Progress bars on a terminal (stderr); silent with --quiet or when stderr is not a tty."""

from __future__ import annotations

import sys
from typing import Any


def progress(total: int, desc: str, quiet: bool) -> Any:
    """A tqdm bar, disabled when ``quiet`` or stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=True)


def warn(message: str, quiet: bool = False) -> None:
    """One warning line on stderr."""
    if not quiet:
        print(f"harness: warning: {message}", file=sys.stderr)
