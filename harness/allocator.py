"""Keep glibc from returning large blocks to the system after every batch (page-fault tax).

On the CPU, large activations are freed and mapped in again per batch; at batch 32-64 that costs up
to 1.5x. ``mallopt`` turns off mmap for large blocks and trimming, the same as
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=...``.
Set ``HARNESS_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings once per process (glibc on Linux only); return whether they are active."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("HARNESS_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 64 << 30)
        ok = ok and libc.mallopt(M_TOP_PAD, 256 << 20)
        _tuned = bool(ok)
    except (OSError, AttributeError):
        _tuned = False
    return _tuned
