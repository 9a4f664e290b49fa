"""Output folders: checked before any model loads, cleaned of killed writes, and a full disk as one line."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.errors import HarnessError

STALE_TEMP_S = 3600.0
"""A temporary file of another run older than this is left over from a killed write."""

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there; else one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".harness-probe-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HarnessError(f"cannot write to the {what} {folder}: {_reason(exc)}") from None


def remove_stale_temp_files(out: Path, run_id: str) -> int:
    """Delete temporary files that killed writes left next to results; return how many.

    Those of ``run_id`` (whose lock the caller holds) always; those of other runs once they are older
    than :data:`STALE_TEMP_S` (an atomic write takes far less, so they cannot belong to a live write).
    """
    out = Path(out)
    removed = 0
    now = time.time()
    candidates = [*out.glob(".*.tmp"), *(out / run_id).glob("**/*.tmp")]
    for path in candidates:
        mine = path.parent != out or path.name.startswith(f".{run_id}.")
        try:
            if mine or now - path.stat().st_mtime > STALE_TEMP_S:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


@contextmanager
def disk_full_is_one_line() -> Iterator[None]:
    """Turn a full disk (or quota) while a run writes into one line saying ``--resume`` continues."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise HarnessError(
            f"disk full while writing{where}: {_reason(exc)}; the samples written so far are kept: "
            "free some space and run the same command with --resume to continue"
        ) from None
