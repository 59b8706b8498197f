"""Data parallelism on 4 CPU devices (XLA_FLAGS in subprocesses) reproduces 1-device training."""

import json

import jax
import numpy as np
import pytest

from conftest import FAST, cli
from transformer_mt.checkpoint import Checkpoints

FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
ONE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
# f32 sums are reduced in a different order across devices. Adam divides by sqrt(v) + eps, so
# with a tiny eps a gradient that is rounding noise (~1e-10, e.g. a bias whose terms cancel)
# still moves its parameter by ~lr; eps = 1e-6 keeps such noise from being amplified.
SET = [a for o in FAST + ["train.log_every=1", "train.learning_rate=1e-3", "train.warmup_steps=10",
                          "train.adam_eps=1e-6"]
       for a in ("--set", o)]
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


def run(workdir, env, steps, *extra):
    result = cli("train", "--config", "configs/tiny.yaml", "--workdir", str(workdir), *SET,
                 "--set", f"train.max_steps={steps}", "--no-progress", *extra, env=env)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "split" not in r]


def params(workdir, step):
    return jax.tree.leaves(Checkpoints(workdir / "checkpoints").read_state(step)["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    run(root / "one", ONE, 6)
    result = run(root / "four", FOUR, 6)
    assert "4 device(s)" in result.stdout.decode()
    # Checkpoints move between device counts: 1 -> 4 here, 4 -> 1 below.
    run(root / "resumed", ONE, 3)
    run(root / "resumed", FOUR, 6, "--resume")
    return root


def test_four_devices_match_one_device(runs):
    one, four = losses(runs / "one"), losses(runs / "four")
    assert len(one) == len(four) == 6
    np.testing.assert_allclose(four, one, rtol=LOSS_RTOL)
    for a, b in zip(params(runs / "one", 6), params(runs / "four", 6)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL)


def test_checkpoint_moves_between_device_counts(runs):
    np.testing.assert_allclose(losses(runs / "resumed"), losses(runs / "one"), rtol=LOSS_RTOL)
    for a, b in zip(params(runs / "one", 6), params(runs / "resumed", 6)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL)
    # ...and the 4-device checkpoint restores onto this process's single device.
    target = jax.tree.map(jax.numpy.asarray, Checkpoints(runs / "one" / "checkpoints").read_state(6))
    state, meta = Checkpoints(runs / "four" / "checkpoints").restore(6, target)
    assert meta["step"] == 6
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state["params"]))

