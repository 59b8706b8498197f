"""`score`: the model's log-probability of given targets, by teacher forcing.

Pairs are sorted by length and scored in the padded shapes of training (one jit compile per
shape), then put back in input order. Scores are those search reports: the sum of the target
tokens' log-probabilities, EOS included, and that sum over the GNMT length penalty.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_mt import data as data_lib
from transformer_mt import sharding
from transformer_mt.config import Config, ConfigError
from transformer_mt.decode import length_penalty
from transformer_mt.rundir import load_run
from transformer_mt.textio import read_lines
from transformer_mt.tokenizer import PAD_ID
from transformer_mt.translate import clean_line, write_text


@functools.lru_cache(maxsize=8)
def compiled_score(graphdef):
    """jit(teacher-forced log-prob sums per row); jax compiles it once per batch shape."""

    def score(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["src"], batch["tgt_in"])  # [B, T, V] float32, no dropout
        target = jnp.take_along_axis(logits, batch["tgt_out"][..., None], axis=-1)[..., 0]
        logp = target - jax.nn.logsumexp(logits, axis=-1)  # [B, T]
        weights = batch["tgt_out"] != PAD_ID
        return jnp.sum(jnp.where(weights, logp, 0.0), axis=1), jnp.sum(weights, axis=1)

    return jax.jit(score)


class Scorer:
    """Scores target id lists given source id lists with one model structure."""

    def __init__(self, cfg: Config, graphdef, mesh=None, batch_tokens: int | None = None):
        self.graphdef = graphdef
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.buckets = tuple(cfg.data.bucket_lengths)
        self.batch_tokens = batch_tokens or cfg.data.batch_tokens
        if self.batch_tokens < 1:
            raise ConfigError("--batch-tokens must be positive")

    def _padded_length(self, length: int) -> int:
        """The bucket that holds `length`; longer pairs round up to a multiple of the largest
        bucket (each such shape costs one more compile, but no pair is cut)."""
        if length <= self.buckets[-1]:
            return data_lib.bucket_for(length, self.buckets)
        return -(-length // self.buckets[-1]) * self.buckets[-1]

    def score_ids(self, params, src_ids: Sequence[Sequence[int]],
                  tgt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(total log-prob float64 [N], tokens int [N]) of each target given its source.

        src_ids end with EOS (as Tokenizer.encode_src gives them); tgt_ids have neither BOS
        nor EOS (as encode_tgt gives them, or search output cut at EOS): EOS is appended,
        scored and counted. An empty target scores the EOS alone.
        """
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        examples = data_lib.Examples([np.asarray(s, np.int32) for s in src_ids],
                                     [np.asarray(t, np.int32) for t in tgt_ids])
        lengths = [self._padded_length(int(n)) for n in examples.lengths()]
        order = sorted(range(len(examples)), key=lambda i: lengths[i])
        totals, counts = np.zeros(len(examples), np.float64), np.zeros(len(examples), np.int64)
        fn = compiled_score(self.graphdef)
        multiple = sharding.data_size(self.mesh)
        start = 0
        while start < len(order):
            length = lengths[order[start]]
            per_batch = data_lib.examples_per_batch(length, self.batch_tokens)
            chunk = [i for i in order[start : start + per_batch] if lengths[i] == length]
            rows = data_lib.rows_for_bucket(length, self.batch_tokens, multiple)  # one shape per length
            batch = data_lib.pad_batch(examples, np.asarray(chunk), rows, length)  # unused rows: all pad
            total, count = jax.device_get(fn(params, sharding.put_batch(self.mesh, batch)))
            totals[chunk], counts[chunk] = total[: len(chunk)], count[: len(chunk)]
            start += len(chunk)
        return totals, counts


def score_command(args) -> int:
    """Prints `total<TAB>per_token<TAB>normalised` for each line pair of --src/--tgt."""
    sources, targets = read_lines(args.src), read_lines(args.tgt)
    if len(sources) != len(targets):
        raise ConfigError(f"{args.src} has {len(sources)} lines but {args.tgt} has {len(targets)}")
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
    alpha = cfg.decode.alpha if args.alpha is None else args.alpha
    scorer = Scorer(cfg, graphdef, mesh, args.batch_tokens)
    src_ids = tok.encode_src([clean_line(s) for s in sources])
    tgt_ids = tok.encode_tgt([clean_line(t) for t in targets])
    totals, counts = scorer.score_ids(params, src_ids, tgt_ids)
    normalised = totals / np.asarray(length_penalty(counts, alpha), np.float64)
    write_text(args.output, "".join(f"{t:.4f}\t{t / n:.4f}\t{z:.4f}\n" for t, n, z in zip(totals, counts, normalised)))
    print(f"scored {len(sources)} line pair(s) with checkpoint step {step}", file=sys.stderr)
    return 0
