"""How glibc's malloc treats the memory XLA:CPU frees: decoding keeps it, training gives it back.

`keep_freed_memory` (translate, evaluate, serve): glibc keeps what XLA:CPU frees, instead of
handing it back to the OS.

Every run of a search program allocates its temporary buffers, tens of MB a batch. glibc serves a
block that large with a fresh mmap and unmaps it again on free, so each batch page-faults its
buffers in afresh. Translating 10,000 lines at d 128 took ~800,000 page faults, ~10% of the
process's CPU time (benchmarks/RESULTS.md, 2026-12-04). With mmap off, big blocks come from the
heap, and with a high trim threshold the heap keeps what was freed: ~180,000 page faults. The
process's RSS then stays at its peak rather than shrinking between batches, which is what a
translation or a server process has anyway.

`StepTrimmer` (train): the opposite, for peak memory. Training's page faults did not move with
the setting above, but its steps' freed buffers stay in glibc's arenas and raise the next step's
peak; the trimmer returns them after each step (see the class).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import queue
import sys
import threading
import time

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt parameters, from glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before it is given back
TOP_PAD = 64 << 20  # extra asked of the OS each time the heap grows (its default, 128 KiB, kept half the gain)


def keep_freed_memory() -> bool:
    """Sets glibc's malloc so freed blocks stay in the process (see the module's docstring).
    Returns whether it was set: only on Linux with glibc, and not when
    TRANSFORMER_MT_KEEP_FREED_MEMORY=0 (for measuring the difference)."""
    if not sys.platform.startswith("linux") or os.environ.get("TRANSFORMER_MT_KEEP_FREED_MEMORY") == "0":
        return False
    mallopt = _glibc_function("mallopt")  # musl and others have none
    if mallopt is None:
        return False
    results = [mallopt(param, value) for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))]
    return all(r == 1 for r in results)  # each one set, even if another was refused


@functools.lru_cache(maxsize=None)
def _glibc_function(name: str):
    """A function of the process's C library on Linux, or None (another OS, or a libc without it);
    looked up once, as find_library runs ldconfig in a subprocess."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """glibc's malloc_trim(0): hands the free pages inside every malloc arena back to the OS."""
    trim = _glibc_function("malloc_trim")
    return trim is not None and bool(trim(0))


class StepTrimmer:
    """Returns freed memory to the OS after training steps, from a thread of its own.

    A training step's activations and gradients are freed into glibc's arenas, which keep most of
    those pages (they are fragmented by the many small blocks around them), and the next step's
    buffers are allocated partly beside them: at Transformer-base size on a 2-core CPU the process
    held ~1.75 GB between steps where ~1.5 GB was left after a trim, and its peak grew with it
    (benchmarks/RESULTS.md, tenth sitting). malloc_trim(0) after a step finishes hands those pages
    back (12-40 ms at base size). The thread waits for each step's result itself, so the training
    loop never blocks on it, and trims at most once every `min_interval` seconds, so that small
    models' short steps are not slowed by it.
    """

    def __init__(self, min_interval: float = 2.0):
        self._min_interval = min_interval
        self._pending = queue.Queue(maxsize=1)
        self._last = float("-inf")
        self.trims = 0
        self._thread = threading.Thread(target=self._work, name="step-trimmer", daemon=True)
        self._thread.start()

    def after(self, step_result) -> None:
        """Trims once step_result (jax arrays) is computed; skipped when a trim is still pending."""
        try:
            self._pending.put_nowait(step_result)
        except queue.Full:  # the previous step's trim has not run yet
            pass

    def _work(self) -> None:
        import jax  # imported by then: the trainer's first step has run

        while True:
            result = self._pending.get()
            if result is None:
                return
            try:
                jax.block_until_ready(result)
            except Exception:  # a failed step: the training loop meets its error itself
                continue
            finally:
                del result
            self.maybe_trim(time.monotonic())

    def maybe_trim(self, now: float) -> None:
        """Trims unless the last trim was less than min_interval seconds before `now`."""
        if now - self._last >= self._min_interval:
            self._last = now
            self.trims += return_freed_memory()

    def close(self) -> None:
        while self._thread.is_alive():
            try:
                self._pending.put(None, timeout=1.0)
                break
            except queue.Full:  # the worker is still waiting for a step
                continue
        self._thread.join()
