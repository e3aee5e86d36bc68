"""The allocator settings of fedrec's processes (fedrec.heap), read back from glibc's own counters."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes, sys
import numpy as np
from fedrec.heap import keep_freed_blocks

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
ok = keep_freed_blocks() if sys.argv[1] == "fedrec" else True
warm = np.ones(4 << 20, np.float32)  # one 16 MB block made and freed: glibc's own threshold rises to it
del warm
blocks = [np.ones(4 << 20, np.float32) for _ in range(3)]  # three at once, as a pass of serving makes
mapped = libc.mallinfo2().hblkhd
del blocks
print(ok, mapped, libc.mallinfo2().fordblks)
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    ok, mapped, free = out.stdout.split()
    return ok == "True", int(mapped), int(free)


def test_a_fedrec_process_keeps_the_blocks_serving_frees_where_glibc_would_give_them_back():
    """Serving makes and frees several 16 MB blocks at a time. By default glibc gives the freed top of its heap
    back beyond twice its largest block (32 MB) and faults it in again for the next pass; with fedrec's settings
    (what the CLI and every ClientApp make first) the 48 MB stay in the heap, free."""
    ok, mapped, free = _probe("fedrec")
    assert ok and mapped < 16 << 20 and free >= 48 << 20
    _, _, free_default = _probe("default")
    assert free_default < 48 << 20
