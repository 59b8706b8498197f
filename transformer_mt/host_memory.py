"""`keep_freed_memory`: glibc keeps the memory XLA:CPU frees, instead of handing it back to the OS.

Every run of a search program allocates its temporary buffers, tens of MB a batch. glibc serves a
block that large with a fresh mmap and unmaps it again on free, so each batch page-faults its
buffers in afresh. Translating 10,000 lines at d 128 took ~800,000 page faults, ~10% of the
process's CPU time (benchmarks/RESULTS.md, 2026-12-04). With mmap off, big blocks come from the
heap, and with a high trim threshold the heap keeps what was freed: ~180,000 page faults. The
process's RSS then stays at its peak rather than shrinking between batches, which is what a
translation or a server process has anyway.

Training was measured too and is left alone: its page faults did not move.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt parameters, from glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before it is given back
TOP_PAD = 64 << 20  # extra asked of the OS each time the heap grows (its default, 128 KiB, kept half the gain)


def keep_freed_memory() -> bool:
    """Sets glibc's malloc so freed blocks stay in the process (see the module's docstring).
    Returns whether it was set: only on Linux with glibc, and not when
    TRANSFORMER_MT_KEEP_FREED_MEMORY=0 (for measuring the difference)."""
    if not sys.platform.startswith("linux") or os.environ.get("TRANSFORMER_MT_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    results = [mallopt(param, value) for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))]
    return all(r == 1 for r in results)  # each one set, even if another was refused
