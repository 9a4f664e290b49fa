"""One lock per run id, so two identical runs started at once cannot write one samples file together.

The lock is ``fcntl.flock`` on ``<out>/.<run_id>.lock`` (non-blocking). The kernel drops it when the
process ends, even on SIGKILL, so a killed run never leaves a stale lock. The second run does not
wait: it stops with one line naming the process that holds the lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]


def lock_path(out: Path, run_id: str) -> Path:
    """Where the lock of ``run_id`` lives."""
    return Path(out) / f".{run_id}.lock"


class RunLock:
    """An exclusive lock on a run id for as long as the run writes its files."""

    def __init__(self, out: Path, run_id: str):
        self.path = lock_path(out, run_id)
        self.run_id = run_id
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False when another process holds it."""
        if fcntl is None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock, or raise one line naming the run that holds it."""
        if not self.try_acquire():
            raise HarnessError(f"run {self.run_id} is already running ({self.holder()}); wait for it to finish "
                               "(or stop it and run again with --resume)")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as far as its file says."""
        try:
            info: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']}, started {info['started_at']}: {' '.join(info['argv'])[:120]}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process holds {self.path}"

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
