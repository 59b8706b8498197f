"""A checkpoint's params as one flat file beside the program store, so that a translation starts
without orbax: importing it and restoring through it took 0.4-0.5 s of each `translate` of the
default model and ~0.8 s at Transformer-base size (benchmarks/RESULTS.md, 2026-12-04), where
reading the same bytes from one file takes milliseconds.

A file is written after the first restore of a checkpoint's params through orbax, under a key
of the step directory's real path, the size and modification time of every file in it, and the
params' structure, shapes and dtypes: a checkpoint written again (a new run in the same place)
gives a new key, so a stale copy is never read. A file that cannot be read back, or whose arrays
do not match, is ignored. Only the MAX_FILES most recently used are kept; deleting the directory
is always safe. Off wherever the program store is off.

Layout: 8 bytes of header length (little-endian), a JSON header listing each array's dtype,
shape and byte offset from the first array, then the arrays' bytes, each at a 64-byte boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_mt import program_store

FORMAT = 1
MAX_FILES = 4  # a base-size model's params are ~250 MB: a few recent checkpoints, not every one
ALIGN = 64
SUFFIX = ".params"


def _key(step_dir: Path, target: Any) -> str | None:
    """The key of step_dir's params restored onto target, or None when the directory cannot be listed."""
    step_dir = Path(step_dir).resolve()
    files = []
    try:
        for root, _, names in os.walk(step_dir):
            for name in names:
                stat = os.stat(os.path.join(root, name))
                files.append((os.path.relpath(os.path.join(root, name), step_dir), stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    leaves, treedef = jax.tree.flatten(target)
    arrays = [(tuple(x.shape), np.dtype(x.dtype).str) for x in leaves]
    text = repr((FORMAT, str(step_dir), sorted(files), str(treedef), arrays))
    return hashlib.sha256(text.encode()).hexdigest()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _path(step_dir: Path, target: Any) -> Path | None:
    directory = program_store.store_dir("params")
    if directory is None:
        return None
    key = _key(step_dir, target)
    return None if key is None else directory / f"{key}{SUFFIX}"


def load(step_dir: Path, target: Any) -> Any | None:
    """The params of step_dir laid out like target (ShapeDtypeStructs carrying shardings), from
    the cache, or None when it holds no valid copy."""
    path = _path(step_dir, target)
    if path is None:
        return None
    leaves, treedef = jax.tree.flatten(target)
    try:
        with open(path, "rb") as f:
            payload = f.read()
        size = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8:8 + size])
        start = _aligned(8 + size)
        if len(header) != len(leaves):
            return None
        arrays = []
        for (dtype, shape, offset), leaf in zip(header, leaves):
            dtype = np.dtype(jax.numpy.dtype(dtype))
            if tuple(shape) != tuple(leaf.shape) or dtype != np.dtype(leaf.dtype):
                return None
            count = int(np.prod(shape, dtype=np.int64))
            arrays.append(np.frombuffer(payload, dtype, count, start + offset).reshape(shape))
    except (OSError, ValueError, TypeError):  # absent, truncated or foreign: restore through orbax
        return None
    try:
        os.utime(path)  # last used now: `prune` keeps the most recently used
    except OSError:
        pass
    placed = jax.device_put(arrays, [leaf.sharding for leaf in leaves])
    return jax.tree.unflatten(treedef, placed)


def save(step_dir: Path, target: Any, params: Any) -> None:
    """Writes params (restored from step_dir onto target) to the cache, whole or not at all; a
    cache that cannot be written only costs the next start orbax's restore."""
    path = _path(step_dir, target)
    if path is None:
        return
    try:
        arrays = [np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)
                  for x in jax.tree.leaves(params)]
        header, offset = [], 0
        for a in arrays:
            header.append((a.dtype.name, list(a.shape), offset))
            offset = _aligned(offset + a.nbytes)
        text = json.dumps(header).encode()
        start = _aligned(8 + len(text))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(len(text).to_bytes(8, "little") + text)
                for a, (_, _, where) in zip(arrays, header):
                    f.seek(start + where)
                    f.write(np.ascontiguousarray(a).tobytes())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except Exception:  # noqa: BLE001 (a full or read-only disk: the next start restores through orbax)
        return
    prune(path.parent)


def prune(directory: Path, keep: int = MAX_FILES) -> None:
    """Removes all but the `keep` most recently used files."""
    try:
        entries = sorted((e.stat().st_mtime, e.path) for e in os.scandir(directory) if e.name.endswith(SUFFIX))
    except OSError:
        return
    for _, path in entries[: max(0, len(entries) - keep)]:
        try:
            os.unlink(path)
        except OSError:
            pass
