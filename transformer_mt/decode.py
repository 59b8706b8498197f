"""Greedy and beam search over `tokens_to_logits(ids, cache) -> (logits, cache)`.

Decoding knows nothing of the model, so it can be tested on a hand-made Markov chain. The
cache is the caller's: beam search hands it over with one row per hypothesis ([batch * beam],
beams of a sentence adjacent) and, after each step, calls `reorder_cache(cache, parents)` with
each new hypothesis' parent beam ([batch, beam]). The default reorder gathers every leaf's rows
(scalar leaves, such as a shared position, are left alone); a model can instead keep its
entries in place and record ancestry (see model.Transformer.reorder_cache). Both searches run
under jit with `lax.while_loop` and stop early.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1.0e9


def expand_to_beams(tree, beam_size: int):
    """Repeats each row beam_size times: row b -> rows b*beam .. b*beam+beam-1 (scalars kept)."""
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0) if x.ndim else x, tree)


def length_penalty(length, alpha: float):
    """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al., 2016)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


CHUNK = 32  # vocabulary entries reduced together by the chunked argmax and top-k


def _chunkable(vocab_size: int, chunk: int = CHUNK) -> bool:
    return vocab_size % chunk == 0 and vocab_size > 4 * chunk


def chunk_maxima(x, banned_ids=(), chunk: int = CHUNK):
    """x [..., V] (V a multiple of chunk) -> [..., V // chunk]: each chunk's maximum over the ids
    not in banned_ids (-inf where all are banned). One plain reduction over x; only the few
    chunks that hold banned ids are reduced again, masked: a mask over all of x would cost XLA:CPU
    a pass that writes a copy of x."""
    *lead, vocab_size = x.shape
    chunks = x.reshape(*lead, vocab_size // chunk, chunk)
    maxima = jnp.max(chunks, axis=-1)
    for c in _banned_chunks(banned_ids, chunk):
        keep = ~np.isin(np.arange(c * chunk, (c + 1) * chunk), banned_ids)
        maxima = maxima.at[..., c].set(jnp.max(jnp.where(keep, chunks[..., c, :], -jnp.inf), axis=-1))
    return maxima


def _banned_chunks(banned_ids, chunk: int) -> list[int]:
    """The chunks (of `chunk` ids) that hold a banned id."""
    return sorted({int(i) // chunk for i in banned_ids})


def _maxima_and_top(x, banned_ids=(), chunk: int = CHUNK):
    """(chunk_maxima(x) or None when x's last axis is not chunkable, jnp.max(x, axis=-1,
    keepdims=True)). With maxima, the row maximum is taken from them and the banned ids' own
    entries: the same value (a maximum is exact) without another pass over x."""
    if not _chunkable(x.shape[-1], chunk):
        return None, jnp.max(x, axis=-1, keepdims=True)
    maxima = chunk_maxima(x, banned_ids, chunk)
    top = jnp.max(maxima, axis=-1, keepdims=True)
    if banned_ids:
        top = jnp.maximum(top, jnp.max(x[..., np.asarray(banned_ids)], axis=-1, keepdims=True))
    return maxima, top


def first_argmax(x, banned_ids=(), chunk: int = CHUNK, maxima=None):
    """jnp.argmax over the last axis of x [B, V] (the first index of the maximum), banned_ids
    excluded. XLA:CPU runs argmax's (value, index) pair reduction unvectorised, several times
    slower than plain reductions; so: each chunk's maximum (`chunk_maxima`, or given), the first
    chunk holding the overall maximum, then the first index of it inside that chunk (the same
    index: no earlier chunk holds the maximum)."""
    rows, vocab_size = x.shape
    if not _chunkable(vocab_size, chunk):
        banned = _banned(vocab_size, banned_ids)
        return _plain_first_argmax(x if banned is None else jnp.where(banned, -jnp.inf, x))
    maxima = chunk_maxima(x, banned_ids, chunk) if maxima is None else maxima
    best = _plain_first_argmax(maxima)  # [B]
    within = jnp.take_along_axis(x.reshape(rows, -1, chunk), best[:, None, None], axis=1)[:, 0]  # [B, chunk]
    if banned_ids:
        banned = _banned(vocab_size, banned_ids).reshape(-1, chunk)[best]
        within = jnp.where(banned, -jnp.inf, within)
    return best * chunk + _plain_first_argmax(within)


def _plain_first_argmax(x):
    """The first index of the maximum as a max, then a min over the indices where it sits."""
    vocab = x.shape[-1]
    at_max = x == jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(at_max, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)  # a row of NaNs has no maximum


def top_k(x, k: int, chunk: int = CHUNK):
    """lax.top_k(x [B, M], k), the same values and indices (ties: lowest index first), for k much
    smaller than M: the k best chunks of `chunk` entries by their maximum hold the k best entries,
    so one vectorised max over all of x and two small top-k's replace a top-k over all of x, which
    XLA:CPU runs as a slow per-row partial sort. Chunks are taken in index order, so ties resolve
    as in lax.top_k."""
    rows, size = x.shape
    if size <= 4 * k * chunk:
        return jax.lax.top_k(x, k)
    pad = -size % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    chunks = x.reshape(rows, -1, chunk)  # [B, C, chunk]
    return _top_of_chunks(jnp.max(chunks, axis=2),
                          lambda best: jnp.take_along_axis(chunks, best[:, :, None], axis=1), k)


def _top_of_chunks(chunk_best, entries_of, k: int):
    """The second half of a chunked top-k: chunk_best [B, C] is each chunk's best entry;
    entries_of(ids [B, k]) returns those chunks' entries [B, k, chunk]. The k best chunks, taken
    in index order so that ties resolve as in lax.top_k, hold the k best entries; returns their
    values and flat indices (chunk id * chunk + position)."""
    _, best = jax.lax.top_k(chunk_best, k)  # [B, k] chunk ids
    best = jnp.sort(best, axis=1)
    within = entries_of(best)
    chunk = within.shape[-1]
    values, pos = jax.lax.top_k(within.reshape(within.shape[0], k * chunk), k)
    return values, jnp.take_along_axis(best, pos // chunk, axis=1) * chunk + pos % chunk


def _prefix_token(prefix, prefix_lens, step):
    """(forced [N] bool, token [N]) of a target prefix [N, P] at `step` (P may be 0)."""
    if prefix is None or prefix.shape[1] == 0:
        return None, None
    token = jax.lax.dynamic_index_in_dim(prefix, jnp.minimum(step, prefix.shape[1] - 1), axis=1, keepdims=False)
    return step < prefix_lens, token


def _banned(vocab_size: int, banned_ids):
    """bool [V]: True for ids the search may never emit (e.g. padding, BOS)."""
    return jnp.isin(jnp.arange(vocab_size), jnp.asarray(banned_ids, jnp.int32)) if banned_ids else None


def _extension_scores(logits, alive_logp, step, eos_id, max_lens, prefix=None, prefix_lens=None, banned_ids=(),
                      chunk: int = CHUNK):
    """The scores of every one-token extension of the alive hypotheses, as a function.

    logits [batch, beam, V] -> (rows, score, chunk_best): rows holds per-hypothesis terms
    [batch, beam, 1]; score(x, vocab, banned, rows) gives alive_logp + log_softmax(logits) at
    logits x of token ids vocab with banned flags banned, NEG_INF where not allowed (rows at their
    length limit may only emit EOS, rows inside their prefix only the prefix token, banned ids
    never), for the rows as they are or gathered. chunk_best [batch, beam, V // chunk] is the best
    score in each chunk of `chunk` tokens (None when V is not chunkable).
    Returned as a function so that the search scores only the few entries it keeps. chunk_best
    comes from the chunks' maximum logits: a score is a non-decreasing function of its logit
    (subtractions and an addition, each rounded monotonically), so the best score of a chunk is
    the score of its best allowed logit, bit for bit, and [batch, beam, V] scores are never formed."""
    batch, beam, vocab_size = logits.shape
    maxima, top = _maxima_and_top(logits, banned_ids, chunk)
    # As jax.nn.log_softmax computes it: (x - max) - log(sum(exp(x - max))).
    rows = {"alive": alive_logp[:, :, None], "max": top,
            "log_norm": jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)),
            "limit": (step + 1 >= max_lens).reshape(batch, beam, 1)}
    forced, token = _prefix_token(prefix, prefix_lens, step)
    if forced is not None:
        rows["forced"], rows["token"] = forced.reshape(batch, beam, 1), token.reshape(batch, beam, 1)

    def logp(x, rows):
        return (x - rows["max"]) - rows["log_norm"]

    def score(x, vocab, banned, rows):
        allowed = ~rows["limit"] | (vocab == eos_id)
        if banned is not None:
            allowed = allowed & ~banned
        if "forced" in rows:
            allowed = jnp.where(rows["forced"], vocab == rows["token"], allowed)
        return rows["alive"] + jnp.where(allowed, logp(x, rows), NEG_INF)

    if maxima is None:
        return rows, score, None
    alive, floor = rows["alive"], rows["alive"] + NEG_INF  # floor: a not-allowed extension's score
    ids = np.arange(vocab_size // chunk)
    with_banned = np.isin(ids, _banned_chunks(banned_ids, chunk))
    free = alive + logp(maxima, rows)  # -inf where every id of the chunk is banned
    best = jnp.where(with_banned, jnp.maximum(free, floor), free)

    def only(token, x, ok):  # rows that may emit one token, of logit x, and nothing else
        return jnp.where((ids == token // chunk) & ok, jnp.maximum(alive + logp(x, rows), floor), floor)

    best = jnp.where(rows["limit"], only(eos_id, logits[..., eos_id:eos_id + 1], eos_id not in banned_ids), best)
    if forced is not None:
        best = jnp.where(rows["forced"], only(rows["token"], jnp.take_along_axis(logits, rows["token"], axis=-1), True),
                         best)
    return rows, score, best


def _top_extensions(logits, rows, score, chunk_best, banned, k: int, chunk: int = CHUNK):
    """lax.top_k over the flattened [batch, beam * V] extension scores (values and flat indices,
    ties to the lowest index), without storing those scores: as in `top_k`, the k best chunks of
    `chunk` tokens by their best score (chunk_best, from `_extension_scores`) hold the k best
    extensions; only the kept chunks are scored."""
    batch, beam, vocab_size = logits.shape
    vocab = jnp.arange(vocab_size, dtype=jnp.int32)
    if chunk_best is None:
        return top_k(score(logits, vocab, banned, rows).reshape(batch, -1), k)
    per_beam = vocab_size // chunk
    chunks = logits.reshape(batch, beam, per_beam, chunk)

    def scored_chunks(best):  # the kept chunks' extension scores [batch, k, chunk]
        kept = jnp.take_along_axis(chunks.reshape(batch, beam * per_beam, chunk), best[:, :, None], axis=1)
        kept_rows = {name: jnp.take_along_axis(r[:, :, 0], best // per_beam, axis=1)[:, :, None]
                     for name, r in rows.items()}
        kept_vocab = (best % per_beam)[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)
        kept_banned = None if banned is None else banned[kept_vocab]
        return score(kept, kept_vocab, kept_banned, kept_rows)

    return _top_of_chunks(chunk_best.reshape(batch, beam * per_beam), scored_chunks, k)


def greedy_search(tokens_to_logits, cache, *, batch_size: int, max_steps: int, bos_id: int, eos_id: int,
                  pad_id: int = 0, max_lens=None, prefix=None, prefix_lens=None, sampler=None, keys=None,
                  banned_ids=(), with_scores: bool = True, argmax_step=None):
    """Returns (tokens int32 [batch, max_steps], scores float32 [batch]).

    tokens hold the generated ids (no BOS), the EOS where one was produced and pad after it;
    scores are the summed log-probabilities of the generated tokens under the model.
    prefix [batch, P] with prefix_lens [batch]: tokens forced first (then the search is free).
    sampler(logits [batch, V], keys [batch, 2]) -> ids draws the next token instead of the
    argmax (see `make_sampler`), with per-row keys [batch, 2] folded with the step, so a row's
    draws do not depend on the other rows in its batch. banned_ids (e.g. padding and BOS) are
    never chosen; scores stay the model's log-probabilities. with_scores=False (argmax search
    only) skips the log-probabilities and returns zero scores: the same tokens, without the pass
    of exp over the vocabulary each step (~10% of a default-size greedy step on a CPU). Then
    argmax_step(ids, cache) -> (the first argmax of the allowed logits [B], cache), where given,
    takes tokens_to_logits' place (the model picks them without writing the logits).
    """
    fused = argmax_step is not None and not with_scores and sampler is None
    max_lens = jnp.full((batch_size,), max_steps + 1, jnp.int32) if max_lens is None else max_lens

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_steps) & ~jnp.all(done)

    def body(carry):
        step, last, tokens, done, scores, cache = carry
        scored = with_scores or sampler is not None  # a sampler draws from the shifted logits
        if fused:
            nxt, cache = argmax_step(last, cache)
        else:
            logits, cache = tokens_to_logits(last, cache)  # [B, V]
            logits = logits.astype(jnp.float32)
            nxt, norm = _choose(logits, banned_ids, scored, sampler,
                                None if sampler is None else jax.vmap(jax.random.fold_in, (0, None))(keys, step))
        nxt = jnp.where(step + 1 >= max_lens, eos_id, nxt).astype(jnp.int32)  # [B]
        forced, token = _prefix_token(prefix, prefix_lens, step)
        if forced is not None:
            nxt = jnp.where(forced, token, nxt)
        if scored:
            scores = scores + jnp.where(done, 0.0, _log_prob(logits, nxt, norm))
        nxt = jnp.where(done, pad_id, nxt)
        tokens = tokens.at[:, step].set(nxt)
        return step + 1, nxt, tokens, done | (nxt == eos_id), scores, cache

    init = (jnp.int32(0), jnp.full((batch_size,), bos_id, jnp.int32),
            jnp.full((batch_size, max_steps), pad_id, jnp.int32), jnp.zeros((batch_size,), bool),
            jnp.zeros((batch_size,), jnp.float32), cache)
    _, _, tokens, _, scores, _ = jax.lax.while_loop(cond, body, init)
    return tokens, scores


def _choose(logits, banned_ids, scored: bool, sampler=None, step_keys=None):
    """Each row's next token: the first argmax of the allowed logits, or the sampler's draw
    (step_keys [B, 2]) from them. No full log-softmax: with `scored`, also the (top, log_norm)
    that `_log_prob` scores a chosen token with, as jax.nn.log_softmax computes it (and beam
    search scores it)."""
    norm = None
    maxima = None
    if scored:
        maxima, top = _maxima_and_top(logits, banned_ids)
        norm = (top, jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)))  # [B, 1], [B]
    if sampler is None:
        return first_argmax(logits, banned_ids, maxima=maxima), norm
    banned = _banned(logits.shape[-1], banned_ids)
    shifted = logits - norm[0]
    choosable = shifted if banned is None else jnp.where(banned, -jnp.inf, shifted)
    return sampler(choosable, step_keys), norm


def _log_prob(logits, tokens, norm):
    """Log-probabilities [B] of tokens [B] under logits [B, V] (norm from `_choose`)."""
    top, log_norm = norm
    return (jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top[:, 0]) - log_norm


def greedy_rows(tokens_to_logits, state, *, steps: int, eos_id: int, pad_id: int = 0, banned_ids=()):
    """Up to `steps` greedy steps of rows that each sit at a position of their own (continuous
    batching: rows join and leave between calls; rowpool.py). state: {"last" [B], "tokens"
    [B, T], "done" [B] bool, "scores" [B], "max_lens" [B], "cache"}, cache["positions"] [B]
    being each row's step. A row does what `greedy_search` does to it at the same step, so its
    tokens and score are those of a batch of its own; a done row (finished, or a free slot)
    stays where it is. Stops early when every row is done."""
    rows = jnp.arange(state["done"].shape[0])

    def cond(carry):
        i, state = carry
        return (i < steps) & ~jnp.all(state["done"])

    def body(carry):
        i, state = carry
        done, position = state["done"], state["cache"]["positions"]
        logits, cache = tokens_to_logits(state["last"], state["cache"])
        logits = logits.astype(jnp.float32)
        nxt, norm = _choose(logits, banned_ids, True)
        nxt = jnp.where(position + 1 >= state["max_lens"], eos_id, nxt).astype(jnp.int32)
        scores = state["scores"] + jnp.where(done, 0.0, _log_prob(logits, nxt, norm))
        nxt = jnp.where(done, pad_id, nxt)
        tokens = state["tokens"].at[rows, position].set(nxt, mode="drop")
        cache = {**cache, "positions": jnp.where(done, position, cache["positions"])}
        return i + 1, {**state, "last": nxt, "tokens": tokens, "done": done | (nxt == eos_id), "scores": scores,
                       "cache": cache}

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """A `sampler` for greedy_search: draws from softmax(logits / temperature), restricted to the
    top_k most likely tokens (0: all) and to the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al., 2020; 1.0: all)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def sample(logits, keys):  # logits [N, V], keys [N, 2]
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1]
            logits = jnp.where(logits >= kth, logits, NEG_INF)
        if top_p < 1.0:
            ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [N, V] descending
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            # The smallest threshold whose tokens still start below top_p: the most likely
            # token is always kept.
            threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits >= threshold, logits, NEG_INF)
        return jax.vmap(jax.random.categorical)(keys, logits)

    return sample


def gather_beams(tree, parents):
    """Default `reorder_cache`: leaves [batch * beam, ...] take the rows of parents [batch, beam]."""
    batch_size, beam_size = parents.shape
    flat = (parents + jnp.arange(batch_size)[:, None] * beam_size).reshape(-1)  # [batch * beam]
    return jax.tree.map(lambda x: x[flat] if x.ndim else x, tree)


def _take(x, indices):
    """x [batch, n, ...] -> [batch, k, ...] at indices [batch, k]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(tokens_to_logits, cache, *, batch_size: int, beam_size: int, max_steps: int, bos_id: int,
                eos_id: int, pad_id: int = 0, alpha: float = 0.6, max_lens=None, nbest: int = 1,
                reorder_cache=gather_beams, prefix=None, prefix_lens=None, banned_ids=()):
    """cache holds batch * beam_size hypotheses (see the module docstring); prefix [batch, P]
    with prefix_lens [batch] are tokens every hypothesis starts with (forced); banned_ids are
    never emitted. Returns (tokens int32 [batch, nbest, max_steps], scores [batch, nbest], log_probs [batch, nbest]).

    scores = log_probs / length_penalty(length incl. EOS, alpha), best first. Each step takes the
    top 2*beam extensions, so even when every alive beam ends at once, beam alive ones remain;
    ending candidates ranked within the top beam join the finished set by top-k over old and
    new, so none is lost to a lower-scoring one. A sentence stops once it has beam finished
    hypotheses and no alive one can beat the worst of them at the most favourable length.
    Every returned hypothesis ends with EOS (forced at the length limit).
    """
    k2 = 2 * beam_size
    max_lens = jnp.full((batch_size,), max_steps, jnp.int32) if max_lens is None else jnp.minimum(max_lens, max_steps)
    beam_max_lens = jnp.repeat(max_lens, beam_size)  # [batch * beam]
    if prefix is not None:
        prefix, prefix_lens = jnp.repeat(prefix, beam_size, axis=0), jnp.repeat(prefix_lens, beam_size)

    alive_seq = jnp.full((batch_size, beam_size, max_steps), pad_id, jnp.int32)
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32), (batch_size, 1))
    fin_seq = jnp.full((batch_size, beam_size, max_steps), pad_id, jnp.int32)
    fin_score = jnp.full((batch_size, beam_size), NEG_INF, jnp.float32)
    fin_logp = jnp.full((batch_size, beam_size), NEG_INF, jnp.float32)
    last = jnp.full((batch_size * beam_size,), bos_id, jnp.int32)

    best_penalty = length_penalty(max_steps, alpha) if alpha >= 0 else length_penalty(1, alpha)

    def cond(carry):
        step, _, _, alive_logp, _, fin_score, _, _ = carry
        # A sentence is done when its best alive hypothesis, even at the most favourable length,
        # cannot beat the worst of its beam_size finished ones.
        best_alive = alive_logp[:, 0] / best_penalty
        worst_fin = jnp.min(fin_score, axis=1)
        done = (worst_fin > NEG_INF / 2) & (best_alive < worst_fin)
        return (step < max_steps) & ~jnp.all(done)

    def body(carry):
        step, last, alive_seq, alive_logp, fin_seq, fin_score, fin_logp, cache = carry
        logits, cache = tokens_to_logits(last, cache)  # [batch*beam, V]
        vocab = logits.shape[-1]
        logits = logits.astype(jnp.float32).reshape(batch_size, beam_size, vocab)
        banned = _banned(vocab, banned_ids)
        rows, score, chunk_best = _extension_scores(logits, alive_logp, step, eos_id, beam_max_lens, prefix,
                                                    prefix_lens, banned_ids)
        top_logp, top_idx = _top_extensions(logits, rows, score, chunk_best, banned, k2)  # [batch, 2*beam]
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seqs = _take(alive_seq, parent).at[:, :, step].set(token)  # [batch, 2*beam, max_steps]
        is_eos = token == eos_id
        live = top_logp > NEG_INF / 2

        # Finished: EOS candidates among the top beam_size (as in fairseq, so beam 1 is greedy)
        # merge with the previous finished set.
        in_beam = jnp.arange(k2) < beam_size  # top_k sorts best first
        ends = is_eos & live & in_beam
        new_score = jnp.where(ends, top_logp / length_penalty(step + 1, alpha), NEG_INF)
        all_seq = jnp.concatenate([fin_seq, seqs], axis=1)
        all_score = jnp.concatenate([fin_score, new_score], axis=1)
        all_logp = jnp.concatenate([fin_logp, jnp.where(ends, top_logp, NEG_INF)], axis=1)
        fin_score, keep = jax.lax.top_k(all_score, beam_size)
        fin_seq, fin_logp = _take(all_seq, keep), _take(all_logp, keep)

        # Alive: the best beam_size candidates that did not end.
        alive_cand = jnp.where(is_eos, NEG_INF, top_logp)
        alive_logp, keep = jax.lax.top_k(alive_cand, beam_size)  # [batch, beam]
        alive_seq = _take(seqs, keep)
        chosen_parent = _take(parent, keep)
        cache = reorder_cache(cache, chosen_parent)
        last = _take(token, keep).reshape(-1)
        return step + 1, last, alive_seq, alive_logp, fin_seq, fin_score, fin_logp, cache

    init = (jnp.int32(0), last, alive_seq, alive_logp, fin_seq, fin_score, fin_logp, cache)
    _, _, alive_seq, alive_logp, fin_seq, fin_score, fin_logp, _ = jax.lax.while_loop(cond, body, init)
    # Sentences with fewer than nbest finished hypotheses fall back to alive ones, ranked below
    # every finished hypothesis (cannot happen when max_lens forces EOS within max_steps).
    lengths = jnp.sum(alive_seq != pad_id, axis=-1)
    alive_score = alive_logp / length_penalty(jnp.maximum(lengths, 1), alpha)
    all_seq = jnp.concatenate([fin_seq, alive_seq], axis=1)  # [batch, 2*beam, max_steps]
    all_score = jnp.concatenate([fin_score, alive_score], axis=1)
    rank = jnp.concatenate([fin_score, alive_score - 1e8], axis=1)
    all_logp = jnp.concatenate([fin_logp, alive_logp], axis=1)
    best_rank, order = jax.lax.top_k(rank, nbest)
    # Fewer than nbest possible hypotheses (e.g. a length limit of 1): the rest are [EOS], -inf.
    real = best_rank > NEG_INF / 2  # [batch, nbest]
    empty = jnp.full((max_steps,), pad_id, jnp.int32).at[0].set(eos_id)
    tokens = jnp.where(real[..., None], _take(all_seq, order), empty)
    scores = jnp.where(real, _take(all_score, order), -jnp.inf)
    return tokens, scores, jnp.where(real, _take(all_logp, order), -jnp.inf)
