"""Start a run's processes on this machine: ``--launcher local`` (direct) or ``--launcher torchrun``.

``local`` starts ``nproc`` copies of the command itself, with the environment torchrun would give
them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
on a free port, ``OMP_NUM_THREADS`` = cores / nproc unless set), and no agent process in between:
torchrun's own interpreter imports torch first (3.4 s on a 2-core machine) before any worker starts.
If a worker fails, the others are stopped, and the launcher exits with the failing worker's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from harness.errors import HarnessError

__all__ = ["launch_local", "launch_torchrun", "strip_launcher_args"]

STOP_GRACE_S = 10.0


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--launcher X`` and ``--nproc N`` (either spelling)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--nproc"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--nproc=")):
            continue
        args.append(arg)
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_environments(nproc: int, port: int, base: dict[str, str]) -> list[dict[str, str]]:
    """The environment of each of ``nproc`` local workers (torchrun's variables, one machine)."""
    threads = base.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return [
        dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
             GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=threads)
        for rank in range(nproc)
    ]


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m harness ARGS`` as ``nproc`` ranks; the first non-zero exit code, or 0."""
    if nproc < 1:
        raise HarnessError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "harness", *args]
    processes = [subprocess.Popen(command, env=env) for env in worker_environments(nproc, _free_port(), dict(os.environ))]
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(processes)
                return int(failed[0])
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(processes)
        return 130


def launch_torchrun(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m harness ARGS`` under ``torch.distributed.run --standalone`` with ``nproc`` processes."""
    if nproc < 1:
        raise HarnessError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "harness", *args]
    return subprocess.call(command)
