"""Shared fixtures: tiny configs on the vendored Multi30k data, and one small trained run."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # configs name data files relative to the repository root
# Compiled programs are shared by the tests and their subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TRANSFORMER_MT_STORE_DIR", str(ROOT / ".pytest_cache" / "stores"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformer_mt import config as config_lib  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"
# Fewer pairs, one bucket, a small vocabulary, and one model and optimizer for every training test:
# trainer.compiled_steps then builds the training programs once for the whole session (and the
# persistent cache above serves them to subprocesses with the same device count).
FAST = [
    "data.max_train_examples=600",
    "data.max_len=16",
    "data.bucket_lengths=[16]",
    "data.batch_tokens=512",
    "tokenizer.vocab_size=300",
    "model.d_model=32",
    "model.ffn_dim=64",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "train.learning_rate=5e-3",
    "train.warmup_steps=50",
    # f32 sums are reduced in a different order across devices. Adam divides by sqrt(v) + eps, so
    # with a tiny eps a gradient that is rounding noise (~1e-10, e.g. a bias whose terms cancel)
    # still moves its parameter by ~lr; eps = 1e-6 keeps such noise from being amplified.
    "train.adam_eps=1e-6",
    # Float32 matmuls: with bf16 inputs (model.matmul_dtype auto on a CPU with AVX512-BF16) a
    # rounding-noise difference in a parameter can flip its bf16 rounding, so runs that sum in
    # different orders (1 vs 2 or 4 devices) drift ~1e-3 apart instead of ~1e-6. test_matmul and
    # test_train cover the bf16 path.
    "model.matmul_dtype=float32",
    # Exact float32 decoding (decode.precision auto is bf16 on such CPUs); test_matmul covers the others.
    "decode.precision=float32",
    "train.log_every=5",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (loops, branches, shard_map), depth first."""
    import jax

    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_eqns(sub)


def tiny_config(*overrides: str):
    return config_lib.load(TINY, FAST + list(overrides))


@pytest.fixture
def fast_overrides():
    return list(FAST)


def cli(*args: str, env: dict | None = None, input: bytes | None = None, timeout: int = 600):
    """Runs `python -m transformer_mt.cli ...` in a subprocess; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "transformer_mt.cli", *args], cwd=ROOT, env=full_env,
                          input=input, capture_output=True, timeout=timeout)


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def cli_here(*args: str, input: bytes = b"") -> CliResult:
    """`transformer-mt ARGS` run by cli.main in this process, so it reuses the compiled programs
    of earlier tests; same fields as cli(). (Each test keeps one real subprocess for the entry point.)"""
    from transformer_mt.cli import main

    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", newline="\n", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", newline="\n", write_through=True)
    stdin = io.TextIOWrapper(io.BytesIO(input), encoding="utf-8")
    with mock.patch.object(sys, "stdin", stdin), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny model trained for 400 steps on the FAST data: the first 600 Multi30k pairs, of which
    the ~15 that fit 16 tokens of a 300-piece vocabulary are kept (shared by decoding tests)."""
    from transformer_mt.trainer import train

    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config("train.max_steps=400", "decode.batch_tokens=256", "decode.max_len_cap=24",
                      "decode.beam_size=2", "train.bleu_every=200", "train.bleu_subset=40", "train.patience=5")
    train(cfg, workdir, progress_bar=False)
    return workdir


@pytest.fixture
def copied_run(trained_run, tmp_path):
    """A copy of the trained run that a test may change (its checkpoints get new modification times)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture(scope="session")
def loaded_run(trained_run):
    """(cfg, graphdef, params, tokenizer, mesh) of the trained run, restored once per session."""
    from transformer_mt import rundir

    cfg, graphdef, params, tok, _, mesh = rundir.load_run(trained_run)
    return cfg, graphdef, params, tok, mesh
