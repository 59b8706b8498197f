"""A run's data, ready to train on: tokenizer, token store, batch stream, validation batches.

Every process of a multi-process run agrees on the tokenizer and on each epoch's plan without
exchanging data: process 0 trains (or copies) the tokenizer into the shared run directory and
builds the token store while the others wait; then each process opens the store and reads
only the pairs of its own rows of every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax

from transformer_mt import compile_cache, corpus
from transformer_mt import data as data_lib
from transformer_mt import rundir
from transformer_mt import store as store_lib
from transformer_mt import tokenizer as tok_lib
from transformer_mt.checkpoint import complete_steps
from transformer_mt.config import Config

DEFAULT_TOKENIZER_SAMPLE = 1_000_000  # pairs read for tokenizer training when input_sentence_size is 0


@dataclass
class RunData:
    tok: tok_lib.Tokenizer
    train: data_lib.Examples  # read from the token store
    store: Path
    valid_src: list[str]
    valid_tgt: list[str]
    valid_batches: list  # in the training batches' shapes, this process's rows


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_tokenizer(cfg: Config, workdir: Path, init_from: str | None, resume: bool, fingerprint: str,
                   should_stop: Callable[[], bool]) -> tok_lib.Tokenizer:
    """The run's tokenizer: its own, --init-from's, cfg's, a cached one, or one trained on a
    bounded sample of the corpus (process 0; the others wait and load it)."""
    tcfg = cfg.tokenizer
    sample = tcfg.input_sentence_size or DEFAULT_TOKENIZER_SAMPLE

    def load():
        return tok_lib.load_or_train(tcfg, workdir, lambda: corpus.sample_pairs(cfg.data, sample, cfg.train.seed,
                                                                              should_stop),
                                     cfg.train.seed, compile_cache.tokenizer_dir(), fingerprint, should_stop)

    is_main = jax.process_index() == 0
    if init_from and is_main and not (resume and complete_steps(rundir.checkpoints_dir(workdir))):
        rundir.copy_tokenizer(rundir.parse_checkpoint_path(init_from)[0], workdir)
    if jax.process_count() > 1:
        if is_main:
            load()
        _barrier("tokenizer ready")
    return load()


def prepare(cfg: Config, workdir: Path, init_from: str | None, resume: bool, rows_multiple: int,
            progress: bool, should_stop: Callable[[], bool]) -> RunData:
    dcfg = cfg.data
    fingerprint = corpus.fingerprint(dcfg)
    tok = load_tokenizer(cfg, workdir, init_from, resume, fingerprint, should_stop)
    is_main = jax.process_index() == 0
    if jax.process_count() > 1:
        if is_main:
            store_lib.open_or_build(dcfg, tok, progress, should_stop, data_fingerprint=fingerprint)
        _barrier("token store ready")
    # Other processes find process 0's store on a shared cache directory, else build their own copy.
    train, store = store_lib.open_or_build(dcfg, tok, progress and is_main, should_stop, data_fingerprint=fingerprint)
    valid_src, valid_tgt = corpus.load_split(dcfg, "valid")
    valid = data_lib.tokenize_pairs(tok, valid_src, valid_tgt, (dcfg.pack_lengths or dcfg.bucket_lengths)[-1])
    valid_batches = data_lib.eval_batches(valid, dcfg, rows_multiple, jax.process_index(),
                                          jax.process_count()) if len(valid) else []
    return RunData(tok, train, store, valid_src, valid_tgt, valid_batches)
