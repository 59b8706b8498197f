"""Teacher forcing: one pass of the whole model over given (source, target) pairs.

What `score` (log-probabilities), `attention` (weights) and `translate --alignment` (the last
layer's cross-attention) read. Pairs are sorted by padded length and batched in the buckets of
training, up to batch_tokens padded tokens a batch (one jit compile per shape), and the results
come back in input order. src_ids end with EOS (as Tokenizer.encode_src gives them); tgt_ids
have neither BOS nor EOS (as encode_tgt gives them, or search output cut at EOS).
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_mt import data as data_lib
from transformer_mt import sharding
from transformer_mt.decode_batches import next_power_of_two
from transformer_mt.tokenizer import PAD_ID


def padded_length(length: int, buckets: Sequence[int]) -> int:
    """The training bucket that holds `length`; longer pairs round up to a multiple of the
    largest bucket (one more compile each, but no pair is cut)."""
    if length <= buckets[-1]:
        return data_lib.bucket_for(length, buckets)
    return -(-length // buckets[-1]) * buckets[-1]


def batches(examples: data_lib.Examples, buckets: Sequence[int], batch_tokens: int, mesh,
            one_shape_per_length: bool) -> Iterator[tuple[list[int], dict]]:
    """(indices of the pairs in the batch, the batch {src, tgt_in, tgt_out} on the mesh), in
    order of padded length.

    Rows: with one_shape_per_length, as many as batch_tokens allows at that length (a whole file
    compiles one program per length); else the pair count rounded up to a power of two (a single
    pair is not padded to a full batch). Both round up to a multiple of the data-parallel size;
    unused rows are all padding.
    """
    lengths = [padded_length(int(n), buckets) for n in examples.lengths()]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    multiple = sharding.data_size(mesh)
    start = 0
    while start < len(order):
        length = lengths[order[start]]
        chunk = [i for i in order[start : start + data_lib.examples_per_batch(length, batch_tokens)]
                 if lengths[i] == length]
        if one_shape_per_length:
            rows = data_lib.rows_for_bucket(length, batch_tokens, multiple)
        else:
            rows = -(-next_power_of_two(len(chunk)) // multiple) * multiple
        yield chunk, sharding.put_batch(mesh, data_lib.pad_batch(examples, np.asarray(chunk), rows, length))
        start += len(chunk)


def to_examples(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]]) -> data_lib.Examples:
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
    return data_lib.Examples([np.asarray(s, np.int32) for s in src_ids], [np.asarray(t, np.int32) for t in tgt_ids])


# ----------------------------------------------------------------------------- log-probabilities


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


def score_ids(graphdef, params, mesh, buckets: Sequence[int], batch_tokens: int, src_ids: Sequence[Sequence[int]],
              tgt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(total log-prob float64 [N], tokens int [N]) of each target given its source: the sum of
    the target tokens' log-probabilities, EOS appended, scored and counted (an empty target
    scores the EOS alone). One program per padded length, however many pairs."""
    examples = to_examples(src_ids, tgt_ids)
    totals, counts = np.zeros(len(examples), np.float64), np.zeros(len(examples), np.int64)
    fn = compiled_score(graphdef)
    for chunk, batch in batches(examples, buckets, batch_tokens, mesh, one_shape_per_length=True):
        total, count = jax.device_get(fn(params, batch))
        totals[chunk], counts[chunk] = total[: len(chunk)], count[: len(chunk)]
    return totals, counts


# ----------------------------------------------------------------------------- attention weights


def attention_pass(model, src, tgt_in) -> dict[str, jax.Array]:
    """Teacher forcing over src [B, S] and tgt_in [B, T] (BOS first) -> float32 weights
    {"encoder": [Le, B, H, S, S], "decoder": [Ld, B, H, T, T], "cross": [Ld, B, H, T, S]}."""
    encoded, src_mask, encoder = model.encode(src, return_weights=True)
    _, decoder = model.decode(tgt_in, encoded, src_mask, return_weights=True)
    return {"encoder": jnp.stack(encoder), "decoder": jnp.stack(decoder["self"]),
            "cross": jnp.stack(decoder["cross"])}


@functools.lru_cache(maxsize=8)
def compiled_attention(graphdef, alignment_only: bool = False):
    """jit(attention_pass) for one model structure; one compile per batch shape. alignment_only
    returns just the last decoder layer's cross-attention averaged over heads, [B, T, S]: what
    alignments read, a fraction of the weights to copy off the device."""

    def run(params, src, tgt_in):
        weights = attention_pass(nnx.merge(graphdef, params), src, tgt_in)
        return weights["cross"][-1].mean(axis=1) if alignment_only else weights

    return jax.jit(run)


def teacher_forced_weights(graphdef, params, mesh, buckets: Sequence[int], batch_tokens: int,
                           src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                           alignment_only: bool = False) -> list:
    """The attention weights of each (source, target) pair, padding cut away, in input order.

    Per pair: the dict of attention_pass without the batch axis, encoder [Le, H, S, S],
    decoder [Ld, H, T+1, T+1], cross [Ld, H, T+1, S]; with alignment_only a [T+1, S] array.
    Row t of a decoder array is the step that outputs target piece t (the last outputs EOS).
    """
    examples = to_examples(src_ids, tgt_ids)
    fn = compiled_attention(graphdef, alignment_only)
    out: list = [None] * len(examples)
    for chunk, batch in batches(examples, buckets, batch_tokens, mesh, one_shape_per_length=False):
        weights = jax.device_get(fn(params, batch["src"], batch["tgt_in"]))
        for r, i in enumerate(chunk):
            s, t = len(examples.src[i]), len(examples.tgt[i]) + 1
            if alignment_only:
                out[i] = weights[r, :t, :s]
            else:
                out[i] = {"encoder": weights["encoder"][:, r, :, :s, :s],
                          "decoder": weights["decoder"][:, r, :, :t, :t],
                          "cross": weights["cross"][:, r, :, :t, :s]}
    return out
