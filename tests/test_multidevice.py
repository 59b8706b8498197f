"""Data parallelism on 4 CPU devices (a subprocess with XLA_FLAGS) reproduces 1-device training,
and checkpoints move between device counts in both directions."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST, ROOT, tiny_config
from transformer_mt.checkpoint import Checkpoints
from transformer_mt.trainer import train

FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
# FAST's adam_eps=1e-6 keeps Adam from amplifying rounding noise in the cross-device sums.
STEPS = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=3"]
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "split" not in r]


def params(workdir, step):
    return jax.tree.leaves(Checkpoints(workdir / "checkpoints").read_state(step)["params"])


def copy_at_step(run, dest, step):
    """The run directory as it was right after `step`: later checkpoints and log lines removed."""
    shutil.copytree(run, dest)
    for d in (dest / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    kept = [line for line in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    assert len(jax.devices()) == 1
    train(tiny_config(*STEPS), root / "one", progress_bar=False)  # in this process: 1 device
    copy_at_step(root / "one", root / "one_then_four", 3)
    # One 4-device process runs both 4-device trainings, so they share their compiled programs.
    sets = [a for o in FAST + STEPS for a in ("--set", o)]
    script = (
        "import sys\nfrom transformer_mt.cli import main\n"
        f"sys.exit(main({['train', '--config', 'configs/tiny.yaml', '--workdir', str(root / 'four'), '--no-progress', *sets]!r})"
        f" or main({['train', '--workdir', str(root / 'one_then_four'), '--resume', '--no-progress']!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **FOUR},
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().count("4 device(s)") == 2
    copy_at_step(root / "four", root / "four_then_one", 3)
    train(None, root / "four_then_one", resume=True, progress_bar=False)
    return root


def test_four_devices_match_one_device(runs):
    one, four = losses(runs / "one"), losses(runs / "four")
    assert len(one) == len(four) == 6
    np.testing.assert_allclose(four, one, rtol=LOSS_RTOL)
    for a, b in zip(params(runs / "one", 6), params(runs / "four", 6)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL)


@pytest.mark.parametrize("moved", ["one_then_four", "four_then_one"])
def test_checkpoint_moves_between_device_counts(runs, moved):
    assert len(losses(runs / moved)) == 6
    np.testing.assert_allclose(losses(runs / moved), losses(runs / "one"), rtol=LOSS_RTOL)
    for a, b in zip(params(runs / "one", 6), params(runs / moved, 6)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL)


def test_four_device_checkpoint_restores_onto_one_device(runs):
    target = jax.tree.map(jax.numpy.asarray, Checkpoints(runs / "one" / "checkpoints").read_state(6))
    state, meta = Checkpoints(runs / "four" / "checkpoints").restore(6, target)
    assert meta["step"] == 6
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state["params"]))
