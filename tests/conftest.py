"""Shared fixtures: tiny configs on the vendored Multi30k data, and one small trained run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # configs name data files relative to the repository root
# Compiled programs are shared by the tests and their subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformer_mt import config as config_lib  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"
# Fewer pairs, one bucket and a small vocabulary: each test compiles as little as possible.
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
    "train.log_every=5",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny model trained on 600 Multi30k pairs for 400 steps (shared by decoding tests)."""
    from transformer_mt.trainer import train

    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config("train.max_steps=400", "train.learning_rate=5e-3", "train.warmup_steps=50",
                      "decode.batch_tokens=256", "decode.max_len_cap=24", "decode.beam_size=2",
                      "train.bleu_every=200", "train.bleu_subset=40", "train.patience=5")
    train(cfg, workdir, progress_bar=False)
    return workdir
