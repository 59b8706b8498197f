"""Two real `transformer-mt train` processes joined by jax.distributed (CPU collectives: gloo) on
localhost reproduce one process trained on the same global batches.

The two processes run exactly the README's multi-host recipe: JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment, the same command, one shared --workdir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAST, ROOT, TINY, tiny_config
from transformer_mt.checkpoint import Checkpoints
from transformer_mt.trainer import train

STEPS = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=3"]
# As for 4 devices vs 1 (test_multidevice.py): the gradient all-reduce sums in another order.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5
TIMEOUT_S = 600  # both processes together; a loaded 2-core machine takes about a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry_point() -> str:
    """The installed console script, as the README runs it."""
    path = shutil.which("transformer-mt", path=str(Path(sys.executable).parent)) or shutil.which("transformer-mt")
    if path is None:
        pytest.fail("no transformer-mt command next to this Python: run `pip install -e .` in the repository")
    return path


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(empty)"


def run_two_processes(workdir: Path, logs: Path) -> None:
    """Starts processes 0 and 1, waits for both; any failure kills the other and fails in one line."""
    sets = [a for o in FAST + STEPS for a in ("--set", o)]
    cmd = [entry_point(), "train", "--config", str(TINY), *sets, "--workdir", str(workdir), "--no-progress"]
    address = f"127.0.0.1:{free_port()}"
    logs.mkdir()
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
            env.pop("XLA_FLAGS", None)  # one CPU device per process: 2 in all
            out, err = open(logs / f"process{i}.out", "wb"), open(logs / f"process{i}.err", "wb")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err), out, err))
        deadline = time.time() + TIMEOUT_S
        while any(p.poll() is None for p, _, _ in procs):
            for i, (p, _, _) in enumerate(procs):
                if p.returncode not in (None, 0):
                    pytest.fail(f"process {i} exited with {p.returncode}: {last_line(logs / f'process{i}.err')} "
                                f"(full logs in {logs}; the command is the README's multi-host recipe)")
            if time.time() > deadline:
                pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s (a collective waiting for a peer? "
                            f"logs in {logs}; is 127.0.0.1 reachable and {address} free?)")
            time.sleep(0.2)
        for i, (p, _, _) in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"process {i} exited with {p.returncode}: {last_line(logs / f'process{i}.err')} "
                            f"(full logs in {logs})")
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    train(tiny_config(*STEPS), root / "one", progress_bar=False)  # this process, 1 device
    run_two_processes(root / "two", root / "logs")
    return root


def losses(workdir: Path) -> list[float]:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "split" not in r]


def test_two_processes_match_one(runs):
    out0 = (runs / "logs" / "process0.out").read_text()
    assert "2 device(s)" in out0, f"process 0 did not see 2 devices (logs in {runs / 'logs'}): {out0[-500:]}"
    assert "model:" not in (runs / "logs" / "process1.out").read_text(), "only process 0 reports"
    one, two = losses(runs / "one"), losses(runs / "two")
    assert len(one) == len(two) == 6, f"expected 6 logged steps each, got {len(one)} and {len(two)}"
    np.testing.assert_allclose(two, one, rtol=LOSS_RTOL,
                               err_msg="2-process losses differ from 1 process: the global batch or the "
                               "all-reduce differs (see data.TrainStream, sharding.put_batch)")
    assert Checkpoints(runs / "two" / "checkpoints").steps() == [3, 6]
    a = jax.tree.leaves(Checkpoints(runs / "one" / "checkpoints").read_state(6)["params"])
    b = jax.tree.leaves(Checkpoints(runs / "two" / "checkpoints").read_state(6)["params"])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, atol=PARAM_ATOL, err_msg="2-process parameters differ from 1 process")
