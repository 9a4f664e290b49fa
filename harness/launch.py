"""Start a run's processes on this machine: ``--launcher local`` (direct) or ``--launcher torchrun``.

``local`` starts ``nproc`` copies of the command itself, with the environment torchrun would give
them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
on a free port, ``OMP_NUM_THREADS`` = the cores this process may use / nproc unless set), and no agent process in between:
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = base.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))
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


def worker_command(args: Sequence[str]) -> list[str]:
    """The command every local worker runs: this interpreter, ``-m harness ARGS``."""
    return [sys.executable, "-m", "harness", *args]


def _exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def launch_local(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m harness ARGS`` as ``nproc`` ranks; the first non-zero exit code, or 0. The
    workers are stopped when one fails, and when the launcher is interrupted or terminated."""
    if nproc < 1:
        raise HarnessError(f"--nproc must be at least 1, got {nproc}")
    command = worker_command(args)
    processes: list[subprocess.Popen] = []

    def terminated(signum: int, _frame: object) -> None:
        raise _Stop(128 + signum)

    previous = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for env in worker_environments(nproc, _free_port(), dict(os.environ)):
            processes.append(subprocess.Popen(command, env=env))
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(processes)
                return _exit_code(int(failed[0]))
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(processes)
        return 130
    except _Stop as stop:
        _stop(processes)
        return stop.code
    except OSError as exc:  # a worker could not be started
        _stop(processes)
        raise HarnessError(f"--launcher local: cannot start a worker: {exc.strerror or exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stop(Exception):
    """The launcher received a terminating signal."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def launch_torchrun(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m harness ARGS`` under ``torch.distributed.run --standalone`` with ``nproc`` processes."""
    if nproc < 1:
        raise HarnessError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "harness", *args]
    return subprocess.call(command)
