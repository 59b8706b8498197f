"""An exported CTranslate2 model run the way `transformer-mt translate` decodes, and compared
with ours: the tests and benchmarks/export_check.py use it.

Our search and CTranslate2's agree exactly under these settings:
- Length limit. Ours: a source of n pieces (its EOS counted) may give L = min(max_len_cap,
  floor(max_len_a * n + max_len_b)) tokens, EOS included, and EOS is forced at the L-th. So at
  most L - 1 real tokens: CTranslate2's max_decoding_length = L - 1 (it stops there without an
  EOS, which it would not return anyway). It takes one limit per call, so sentences are grouped
  by their limit. With beams, a hypothesis that reaches the limit is scored by ours with the
  forced EOS's log-probability and by CTranslate2 without it, so such lines may differ.
- min_decoding_length=0 (an immediate EOS is allowed, as in ours; CTranslate2's default is 1).
- Padding and BOS are never output: suppress_sequences=[["<pad>"], ["<s>"]].
- Beam search: ours ranks finished hypotheses by log-prob / ((5 + length) / 6) ** alpha (length
  with EOS), CTranslate2 by log-prob / length ** length_penalty (length without EOS), and it
  stops by a different rule when length_penalty != 0. With alpha = 0 and length_penalty = 0 both
  rank by log-probability and both return the best hypothesis the beam finds (ours stops when no
  alive hypothesis can beat its worst finished one, CTranslate2 when its top candidate ends:
  neither can then improve on the best). With alpha > 0 the closest is length_penalty = 1,
  which is not the same ranking.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID

NEVER_OUTPUT = [["<pad>"], ["<s>"]]


def decoding_limit(settings, src_len: int) -> int:
    """CTranslate2's max_decoding_length for a source of src_len pieces (EOS counted) that gives
    the same outputs as our search under `settings` (translate.SearchSettings)."""
    return settings.max_steps(src_len) - 1


def ct2_translate(translator, sources: Sequence[list[str]], settings, beam_size: int, length_penalty: float = 0.0,
                  max_batch_size: int = 64, suppress: bool | None = None) -> list[list[str]]:
    """Best output pieces (no EOS) for each source piece list (without EOS: the model's config
    adds it), decoded as our search does (see the module docstring)."""
    suppress = beam_size == 1 if suppress is None else suppress
    groups = defaultdict(list)
    for i, pieces in enumerate(sources):
        groups[decoding_limit(settings, len(pieces) + 1)].append(i)
    out: list[list[str]] = [[] for _ in sources]
    for limit, rows in sorted(groups.items()):
        if limit < 1:  # ours emits EOS at once
            continue
        results = translator.translate_batch(
            [sources[i] for i in rows], beam_size=beam_size, length_penalty=length_penalty,
            min_decoding_length=0, max_decoding_length=limit, suppress_sequences=NEVER_OUTPUT if suppress else None,
            max_batch_size=max_batch_size)
        for i, result in zip(rows, results):
            out[i] = result.hypotheses[0]
    return out


def ct2_token_logprobs(translator, sources: Sequence[list[str]], targets: Sequence[list[str]]) -> list[np.ndarray]:
    """CTranslate2's teacher-forced log-probability of each target piece and of the EOS after them."""
    return [np.asarray(r.log_probs, np.float64) for r in translator.score_batch(list(sources), list(targets))]


@functools.lru_cache(maxsize=4)
def _compiled_logprobs(graphdef):
    def logprobs(params, src, tgt_in, tgt_out):
        logits = nnx.merge(graphdef, params)(src, tgt_in)  # [B, T, V] float32
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, tgt_out[..., None], axis=-1)[..., 0]  # [B, T]

    return jax.jit(logprobs)


def our_token_logprobs(graphdef, params, src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]],
                       rows: int = 32) -> list[np.ndarray]:
    """Our model's teacher-forced log-probability of each target id and of the EOS after them
    (src_ids end with EOS, tgt_ids have neither BOS nor EOS), by the training forward pass."""
    fn = _compiled_logprobs(graphdef)
    s_len = -(-max(len(s) for s in src_ids) // 16) * 16
    t_len = -(-(max(len(t) for t in tgt_ids) + 1) // 16) * 16
    out = []
    for start in range(0, len(src_ids), rows):
        chunk = range(start, min(start + rows, len(src_ids)))
        src = np.full((rows, s_len), PAD_ID, np.int32)
        tgt_in = np.full((rows, t_len), PAD_ID, np.int32)
        tgt_out = np.full((rows, t_len), PAD_ID, np.int32)
        for r, i in enumerate(chunk):
            src[r, : len(src_ids[i])] = src_ids[i]
            tgt_in[r, : len(tgt_ids[i]) + 1] = [BOS_ID, *tgt_ids[i]]
            tgt_out[r, : len(tgt_ids[i]) + 1] = [*tgt_ids[i], EOS_ID]
        logp = np.asarray(jax.device_get(fn(params, src, tgt_in, tgt_out)), np.float64)
        out += [logp[r, : len(tgt_ids[i]) + 1] for r, i in enumerate(chunk)]
    return out
