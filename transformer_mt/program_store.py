"""Compiled search programs kept whole on disk, so a new process skips tracing and lowering.

JAX's persistent compilation cache (compile_cache.py) saves XLA's compile, but a process still
traces and lowers every program to find its cache key: 0.5-0.7 s a search program on the 2-core
CPU, 14 of them for a 10,000-line file, a third of `translate`'s run (benchmarks/RESULTS.md,
2026-12-03). Here each compiled program is serialized under a key made of everything that
decides it without tracing: the package's own source code, the jax, jaxlib and flax versions,
the host's CPU flags, the backend and devices, XLA_FLAGS and the jax settings that change a
trace, the model structure, the search settings and the argument shapes and shardings. Any change of these gives a new key, so a stale program is never run; a
file that cannot be read back is ignored (and replaced). Deleting the directory is always safe.

It lives in `programs/` beside the compile cache, and is off when the compile cache is off or
in a multi-process job (each process would write the same files).

A program is stored from a fresh compile only (`compile_fresh`): an executable that XLA:CPU
loaded from JAX's persistent cache serializes without some of its kernels, and fails when run
from the store ("Function ... not found"). So the store's compiles bypass that cache: an inert
compiler option (dumping off) gives them their own cache key, and JAX is kept from writing them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import platform
import re
import tempfile
import threading
from pathlib import Path

import jax

FORMAT = 1  # bump when the file layout changes
MAX_PROGRAMS = 2000  # ~1 MB each for the default model: `prune` keeps the store at most ~2 GB
FRESH_OPTIONS = {"xla_enable_dumping": False}  # changes JAX's cache key, nothing in the program
_FRESH_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of this package's source files (Python and the C++ kernel) and of what compiles them."""
    import flax
    import jaxlib

    digest = hashlib.sha256(f"{FORMAT} {jax.__version__} {jaxlib.__version__} {flax.__version__}".encode())
    digest.update(os.environ.get("XLA_FLAGS", "").encode())
    package = Path(__file__).resolve().parent
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.cc")]):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def store_dir(kind: str = "programs") -> Path | None:
    """`kind/` (programs, models) in the compile cache's directory, or None when caching is off
    or several processes share the job."""
    directory = jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache or not directory or jax.process_count() > 1:
        return None
    return Path(directory) / kind


def remembered(kind: str, parts, build):
    """build(), pickled under `kind/` with the key of `parts` (and the code): read back when there,
    else built and written. Without a store, build()."""
    directory = store_dir(kind)
    if directory is None:
        return build()
    path = directory / f"{program_key(parts)}.pickle"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # absent, truncated or foreign: build it again
        pass
    value = build()
    try:
        _write(directory, path.name, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # an unwritable store only costs the next process the build
        pass
    return value


def _write(directory: Path, name: str, payload: bytes) -> None:
    """payload into directory/name, whole or not at all (a temporary file renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, directory / name)
    except BaseException:
        os.unlink(tmp)
        raise


def structure(graphdef) -> str:
    """A flax graphdef as text that is the same in every process (functions without addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(graphdef))


@functools.lru_cache(maxsize=1)
def host_fingerprint() -> str:
    """The CPU's architecture and instruction-set flags: XLA:CPU compiles for the host's features
    (and "auto" precisions follow them), so a store shared between machines keeps them apart."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


TRACE_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable")  # jax settings that change what a function traces to


def program_key(*parts) -> str:
    """The key of a program: the code fingerprint, the host, the devices, the jax settings that
    change a trace, and `parts`."""
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    options = [(name, getattr(jax.config, name, None)) for name in TRACE_OPTIONS]
    text = repr((code_fingerprint(), host_fingerprint(), jax.default_backend(), devices, options, parts))
    return hashlib.sha256(text.encode()).hexdigest()


LOAD_EVENT = "/transformer_mt/program_store/load"  # jax.monitoring event: a program read from the store


def load(directory: Path, key: str, devices=None):
    """The stored program of `key`, loaded onto `devices` (the mesh's, in its order; None: all
    of the process's), or None (absent or unreadable). A program compiled for some of the
    devices, loaded without them, expects arguments on all of them and fails when run."""
    from jax.experimental import serialize_executable

    path = directory / f"{key}.program"
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        program = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                            execution_devices=devices)
    except Exception:  # absent, truncated or foreign: compile instead, and overwrite it
        return None
    try:
        os.utime(path)  # last used now: `prune` removes the least recently used
    except OSError:
        pass
    jax.monitoring.record_event(LOAD_EVENT)
    return program


def prune(directory: Path, keep: int = MAX_PROGRAMS) -> None:
    """Removes the least recently used programs beyond `keep` (each new version of the code or
    the model writes new ones, and the old are never asked for again)."""
    try:
        entries = [(e.stat().st_mtime, e.path) for e in os.scandir(directory) if e.name.endswith(".program")]
    except OSError:
        return
    if len(entries) <= keep:
        return
    for _, path in sorted(entries)[: len(entries) - keep * 4 // 5]:
        try:
            os.unlink(path)
        except OSError:
            pass


def save(directory: Path, key: str, compiled) -> None:
    """Writes a compiled program under `key` (atomically: a temporary file renamed); a store that
    cannot be written only costs the next process its compile."""
    from jax.experimental import serialize_executable

    try:
        payload = pickle.dumps(serialize_executable.serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
        _write(directory, f"{key}.program", payload)
        prune(directory)
    except Exception:
        return


def load_or_compile(directory: Path, key: str, devices, lower):
    """The program of `key` from the store, else lower() compiled afresh and stored."""
    program = load(directory, key, devices)
    if program is None:
        program = compile_fresh(lower())
        save(directory, key, program)
    return program


def compile_fresh(lowered):
    """lowered.compile(), never served from (nor written to) JAX's persistent compile cache."""
    with _FRESH_LOCK:
        floor = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)  # write nothing
        try:
            return lowered.compile(compiler_options=FRESH_OPTIONS)
        finally:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", floor)
