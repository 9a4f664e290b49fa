"""Runs sharded across processes started by torchrun (gloo on CPU, NCCL on GPUs).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each rank evaluates every
``WORLD_SIZE``-th sample and writes its own samples file, and rank 0 merges them into the run's
samples file and writes the result. Per-sample seeds make each sample's numbers independent of the
rank that computed it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """The world described by torchrun's environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank on a machine gets its own GPU (``cuda:LOCAL_RANK``); CPU stays CPU."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def start(world: World, device: torch.device, timeout_minutes: float = 60.0) -> None:
    """Join the process group (NCCL for CUDA, gloo otherwise) if not joined yet."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(minutes=timeout_minutes),
    )


def barrier(world: World) -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.barrier()


def stop(world: World) -> None:
    """Leave the process group."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
