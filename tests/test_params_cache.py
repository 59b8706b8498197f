"""The params cache: a checkpoint's params read back from it equal orbax's restore, a rewritten
checkpoint or a damaged copy is restored through orbax again, and a cached translation start
imports no orbax. Reading a run never touches a training's unfinished save."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT
from transformer_mt import checkpoint, params_cache, program_store, rundir


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(program_store, "store_dir", lambda kind="programs": tmp_path / "store" / kind)
    return tmp_path / "store" / "params"


@pytest.fixture
def orbax_restores(monkeypatch):
    """How many times params were restored through orbax since the test began."""
    count = []
    real = checkpoint._orbax

    def counted():
        count.append(1)
        return real()

    monkeypatch.setattr(checkpoint, "_orbax", counted)
    return count


def leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def same(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


def test_cached_params_equal_orbax_restore_and_skip_it(copied_run, store, orbax_restores):
    *_, first, _, step, _ = rundir.load_run(copied_run)
    assert orbax_restores and len(list(store.glob("*.params"))) == 1
    orbax_restores.clear()
    *_, again, _, step_again, _ = rundir.load_run(copied_run)
    assert not orbax_restores, "the second start restored through orbax"
    assert step_again == step and same(first, again)
    assert {x.sharding for x in jax.tree.leaves(again)} == {x.sharding for x in jax.tree.leaves(first)}


def test_rewritten_checkpoint_is_not_read_from_the_cache(copied_run, store, orbax_restores):
    rundir.load_run(copied_run)
    step_dir, step = rundir.resolve_step(copied_run, None, False)
    some_file = next(p for p in (step_dir / str(step)).rglob("*") if p.is_file())
    stat = some_file.stat()
    os.utime(some_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # written again, same bytes
    orbax_restores.clear()
    rundir.load_run(copied_run)
    assert orbax_restores


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cache_file_falls_back_to_orbax(copied_run, store, orbax_restores, damage):
    *_, first, _, _, _ = rundir.load_run(copied_run)
    (path,) = store.glob("*.params")
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2] if damage == "truncate" else b"\x07" * len(payload))
    orbax_restores.clear()
    *_, again, _, _, _ = rundir.load_run(copied_run)
    assert orbax_restores and same(first, again)
    assert path.read_bytes() == payload  # written whole again


def test_prune_keeps_the_most_recently_used(tmp_path):
    for k in range(6):
        path = tmp_path / f"{k}{params_cache.SUFFIX}"
        path.write_bytes(b"x")
        os.utime(path, (k, k))
    params_cache.prune(tmp_path, keep=4)
    assert sorted(p.name for p in tmp_path.glob("*.params")) == [f"{k}.params" for k in (2, 3, 4, 5)]


def test_reading_a_run_leaves_an_unfinished_save_alone(copied_run, store):
    """A save in flight is a temporary directory beside the steps; translating from the run while it
    trains must not remove it (orbax's manager cleans them up when it starts)."""
    in_flight = copied_run / rundir.CHECKPOINTS_DIR / "999.orbax-checkpoint-tmp-1234"
    in_flight.mkdir()
    (in_flight / "part").write_bytes(b"being written")
    rundir.load_run(copied_run, last=True)
    assert (in_flight / "part").read_bytes() == b"being written"
    assert 999 not in checkpoint.Checkpoints(copied_run / rundir.CHECKPOINTS_DIR, create=False).steps()


def test_cached_start_imports_no_orbax(copied_run, tmp_path):
    script = ("import sys\nfrom transformer_mt import compile_cache, rundir\n"
              f"compile_cache.enable({str(tmp_path / 'cache')!r})\n"
              f"rundir.load_run({str(copied_run)!r})\n"
              "print('orbax' if 'orbax.checkpoint' in sys.modules else 'none')\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    first, second = (subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=300) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (first.stdout.split(), second.stdout.split()) == (["orbax"], ["none"])
    assert Path(tmp_path / "cache" / "params").is_dir()
