"""Keep glibc from returning large blocks to the system after every batch (page-fault tax).

On the CPU, large activations are freed and mapped in again per batch; at batch 32-64 that costs up
to 1.5x. ``mallopt`` turns off mmap for large blocks and trimming, the same as
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=...``.
Set ``HARNESS_MALLOC_TUNING=0`` to leave the allocator alone.

``mallopt(int param, int value)`` takes C ints, and ctypes silently keeps the low 32 bits of a
larger Python int (``64 << 30`` became 0: a trim threshold of 0, which trimmed the heap after every
large free). So the C signature is declared and a value outside the C int range is refused. A trim
threshold of -1 disables trimming completely (mallopt(3)).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Callable

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers (M_MMAP_THRESHOLD is -3)
M_TOP_PAD = -2
M_MMAP_MAX = -4

NO_TRIM = -1  # trim threshold -1: never give the top of the heap back to the system
TOP_PAD = 256 << 20  # extra bytes asked of the system whenever the heap grows
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_TRIM), (M_TOP_PAD, TOP_PAD))
"""(parameter, value) pairs passed to ``mallopt``, in this order; every value fits a C int."""

_tuned: bool | None = None


INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1


def _mallopt(libc: ctypes.CDLL) -> Callable[[int, int], int]:
    """glibc's ``int mallopt(int param, int value)`` with its C signature declared and its range checked."""
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int

    def call(param: int, value: int) -> int:
        if not INT_MIN <= value <= INT_MAX:  # ctypes would truncate it without a word
            raise ValueError(f"mallopt value {value} does not fit a C int")
        return int(mallopt(param, value))

    return call


def tune_allocator() -> bool:
    """Apply the settings once per process (glibc on Linux only); return whether they are active."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("HARNESS_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _mallopt(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))
        _tuned = all(mallopt(param, value) == 1 for param, value in SETTINGS)  # mallopt returns 1 on success
    except (OSError, AttributeError):
        _tuned = False
    return _tuned
