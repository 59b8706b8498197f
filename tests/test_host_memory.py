"""keep_freed_memory: a big block freed and allocated again is not page-faulted in again."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util, resource, sys
from transformer_mt.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch_block():  # as XLA does with a program's temporary buffers: allocate, write, free
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
touch_block()  # the first time, its pages are new either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch_block()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept == "True", int(faults)

    kept, faults_kept = run("keep")
    if not kept:
        pytest.skip("not glibc")
    _, faults_default = run("default")
    pages = 5 * (64 << 20) // 4096
    if faults_default < pages // 2:  # e.g. transparent huge pages "always": 2 MiB a fault
        pytest.skip(f"a fresh 64 MiB block took {faults_default // 5} page faults here, not ~16,000")
    assert faults_kept < pages // 20  # the freed block is reused, its pages already there


class _Step:
    """A step result whose computation finishes when the test says so (jax.block_until_ready
    calls each leaf's block_until_ready); `moved` is set when the worker starts waiting for it."""

    def __init__(self, moved):
        import threading

        self.done, self.moved, self.waited = threading.Event(), moved, False

    def block_until_ready(self):
        self.waited = True
        self.moved.set()
        self.done.wait()
        return self


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_step_trimmer_trims_after_the_step_finishes_and_at_most_once_an_interval():
    import threading

    from transformer_mt.host_memory import StepTrimmer, return_freed_memory

    if not return_freed_memory():
        pytest.skip("no malloc_trim here (not glibc)")
    trimmer = StepTrimmer(min_interval=0.0)
    moved = threading.Event()  # set by whichever comes first: the wait for the step, or a trim
    trim = trimmer.maybe_trim
    trimmer.maybe_trim = lambda now: (moved.set(), trim(now))
    step = _Step(moved)
    trimmer.after(step)
    moved.wait()
    assert step.waited and trimmer.trims == 0  # the worker waits for the step before trimming
    step.done.set()
    trimmer.close()  # waits for the pending trim
    assert trimmer.trims == 1

    trimmer = StepTrimmer(min_interval=10.0)
    for now in (100.0, 105.0, 109.9, 110.0, 121.0):
        trimmer.maybe_trim(now)
    trimmer.close()
    assert trimmer.trims == 3  # at 100, 110 and 121: the others fell within 10 s of the last


class _FailedStep(_Step):
    def block_until_ready(self):
        self.moved.set()
        raise RuntimeError("the step failed")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_step_trimmer_outlives_a_failed_step():
    """A step that fails is the training loop's to report: the trimmer goes on, and closes."""
    import threading

    from transformer_mt.host_memory import StepTrimmer, return_freed_memory

    if not return_freed_memory():
        pytest.skip("no malloc_trim here (not glibc)")
    trimmer = StepTrimmer(min_interval=0.0)
    moved = threading.Event()
    trimmer.after(_FailedStep(moved))
    moved.wait()
    done = _Step(threading.Event())
    done.done.set()
    trimmer.after(done)
    trimmer.close()
    assert trimmer.trims == 1
