"""Fixed-size chunked evaluation that halves the chunk when the device runs out of memory."""

from __future__ import annotations

from typing import Callable

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator out-of-memory error (CUDA, MPS or CPU)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def map_in_chunks(
    n_items: int,
    chunk_size: int,
    run_chunk: Callable[[int, int], torch.Tensor],
) -> torch.Tensor:
    """Concatenate ``run_chunk(start, stop)`` over ``[0, n_items)`` in chunks of ``chunk_size``.

    A chunk that runs out of memory is retried at half the size (down to 1); later chunks keep the
    smaller size.
    """
    outputs: list[torch.Tensor] = []
    start, size = 0, max(1, int(chunk_size))
    while start < n_items:
        stop = min(n_items, start + size)
        try:
            outputs.append(run_chunk(start, stop))
        except Exception as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
            size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    if not outputs:
        raise ValueError("map_in_chunks needs at least one item")
    return torch.cat(outputs)
