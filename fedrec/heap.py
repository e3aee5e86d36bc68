"""How a fedrec process asks the C allocator to keep the large blocks it frees.

Serving scores every event against the whole catalogue: blocks of up to
:data:`~fedrec.eval.metrics.CELLS` floats (16 MB) are made and freed many times a round. glibc's
``malloc`` hands such a block back to the system when it is freed (or trims the heap's top beyond
128 KB), and the next one faults its pages in again: on this machine a chain of three 16 MB
temporaries took 18 ms against 5 ms with the blocks kept (``benchmarks``-style micro-timing, one
thread). Through ``fedrec simulate`` on ml-latest-small (20 rounds, 61 devices a round, no DP, the
in-process engine; three alternating pairs) the rounds took 7-11% less time and the whole run 10-14%
less, at 2-11% more peak memory (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  #: mallopt's parameter numbers (malloc.h)
#: blocks below this come from the heap, not from a mapping of their own: glibc's largest (32 MB on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: freed memory at the heap's top is given back only beyond this (glibc's default is 128 KB)
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_blocks() -> bool:
    """Set :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` for this process (once); False where the C library
    has no ``mallopt`` (not glibc) or refuses them: nothing changes there, only speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
