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
