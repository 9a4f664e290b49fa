"""harness/allocator.py: the glibc tuning really keeps a large freed block mapped (no trim after a free).

Measured in a fresh subprocess per setting by counting minor page faults (``ru_minflt``) of a second
allocation of a block the size of a batch's activations: counts, not times, so a busy machine does
not change the verdict. The block is larger than the 256 MB top pad, so a trim threshold of 0 (the
old ``64 << 30`` truncated to a C int) gives back the part beyond the pad and faults it in again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="mallopt tuning applies to glibc on Linux only",
)

BLOCK_MB = 384  # > the 256 MB top pad: the old trim threshold of 0 released a third of it per free

PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys

    from harness.allocator import tune_allocator

    print(int(tune_allocator()))
    size = int(sys.argv[1]) << 20
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    def cycle():
        block = libc.malloc(size)
        assert block
        ctypes.memset(block, 1, size)  # touch every page, as a batch's activations do
        libc.free(block)

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(tuning: str) -> tuple[bool, int, int]:
    """(tuned?, minor faults of the second allocation, pages in the block) in a fresh process."""
    env = dict(os.environ, HARNESS_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", PROBE, str(BLOCK_MB)], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "1", int(out[1]), (BLOCK_MB << 20) // os.sysconf("SC_PAGESIZE")


def test_tuned_allocator_keeps_a_large_freed_block_mapped():
    tuned, faults, pages = _faults("1")
    untuned, default_faults, _ = _faults("0")
    assert tuned is True and untuned is False
    # the default allocator maps large blocks afresh each time: every page faults again
    assert default_faults > pages // 1024, "the measurement itself does not see page faults"
    # tuned: the block stays in the heap; with the old truncated threshold a third of it faulted again
    assert faults * 50 < default_faults, (faults, default_faults, pages)


def test_mallopt_values_fit_a_c_int_and_larger_ones_are_refused():
    import ctypes

    from harness.allocator import INT_MAX, INT_MIN, SETTINGS, _mallopt

    assert all(INT_MIN <= value <= INT_MAX for _, value in SETTINGS)
    assert dict(SETTINGS)[-1] == -1  # M_TRIM_THRESHOLD -1: never trim (mallopt(3))
    mallopt = _mallopt(ctypes.CDLL("libc.so.6"))
    with pytest.raises(ValueError, match="C int"):
        mallopt(-1, 64 << 30)  # what ctypes used to truncate to 0 without a word
