"""Keep freed host memory in the process, so CPU timings measure kernels, not page faults.

glibc's malloc gives large freed blocks back to the OS (``munmap`` for blocks above its mmap
threshold, a heap trim for the others). The next allocation of that size then takes a
first-touch page fault per 4 KiB page as it is written, which on the machine this project
was measured on cost more than the kernels: a 16x128x56x56 fp32 train step of any variant
went from ~4 ms to ~20 ms in runs where glibc happened to return its two outputs, and which
runs did depended on the allocation history. Turning the mmap path and trimming off for the
benchmark process makes every variant reuse its memory, as a long training loop with a
caching allocator (jemalloc, tcmalloc) would. ``taskrouting bench --malloc default`` leaves
glibc as it is; ``environment()`` records which was used.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> str:
    """Stop glibc returning freed memory to the OS for the rest of the process.

    Returns what was done (for the report); a no-op off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    mmap = mallopt(_M_MMAP_MAX, 0)
    if trim != 1 or mmap != 1:
        return "default (mallopt refused)"
    return "glibc: no mmap, no trim (freed memory reused, no first-touch page faults)"
