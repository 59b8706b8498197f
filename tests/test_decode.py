"""Search on hand-made Markov chains whose best sequences are known (no model involved)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_mt.decode import (beam_search, expand_to_beams, first_argmax, greedy_search, length_penalty,
                                  make_sampler, top_k)

PAD, BOS, EOS = 0, 2, 3
V = 6  # 0 pad, 1 unk, 2 bos, 3 eos, 4 "a", 5 "b"
WORDS = (EOS, 4, 5)


def chain(seed, batch):
    """A chain whose next-token distribution depends on the previous token and on a per-row
    cache value (how many "a" the row has emitted), so a search that reorders beams without
    reordering the cache scores hypotheses wrongly."""
    rng = np.random.default_rng(seed)
    table = np.full((batch, V, V), -30.0, np.float32)
    table[:, :, list(WORDS)] = rng.normal(size=(batch, V, 3)) * 2
    bonus = rng.normal(size=(batch, V)).astype(np.float32)
    bonus[:, [0, 1, 2]] = 0.0

    def log_probs_np(row, prev, count_a):
        logits = table[row, prev] + bonus[row] * count_a
        return logits - np.logaddexp.reduce(logits)

    def make_fn(rows_per_sentence):
        tab, bon = jnp.asarray(np.repeat(table, rows_per_sentence, 0)), jnp.asarray(np.repeat(bonus, rows_per_sentence, 0))

        def tokens_to_logits(ids, cache):
            logits = tab[jnp.arange(ids.shape[0]), ids] + bon * cache["count_a"][:, None]
            return logits, {"count_a": cache["count_a"] + (ids == 4), "step": cache["step"] + 1}

        return tokens_to_logits

    return log_probs_np, make_fn


def init_cache(n):
    return {"count_a": jnp.zeros((n,), jnp.float32), "step": jnp.zeros((), jnp.int32)}


def sequence_logp(log_probs_np, row, seq):
    total, prev, count = 0.0, BOS, 0
    for tok in seq:
        total += log_probs_np(row, prev, count)[tok]
        count += prev == 4
        prev = tok
    return total


def exhaustive_best(log_probs_np, row, max_steps, alpha):
    best, best_seq = -np.inf, None
    for n in range(1, max_steps + 1):
        for body in itertools.product((4, 5), repeat=n - 1):
            seq = list(body) + [EOS]
            score = sequence_logp(log_probs_np, row, seq) / float(length_penalty(n, alpha))
            if score > best:
                best, best_seq = score, seq
    return best_seq, best


def strip(seq):
    seq = [int(t) for t in seq]
    return seq[: seq.index(EOS) + 1] if EOS in seq else [t for t in seq if t != PAD]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_finds_exhaustive_optimum(alpha):
    batch, max_steps, beam = 6, 5, 16  # 2**4 alive prefixes at most: the beam is exhaustive
    log_probs_np, make_fn = chain(0, batch)
    search = jax.jit(lambda c: beam_search(make_fn(beam), c, batch_size=batch, beam_size=beam,
                                           max_steps=max_steps, bos_id=BOS, eos_id=EOS, alpha=alpha, nbest=3))
    tokens, scores, logps = search(expand_to_beams(init_cache(batch), beam))
    for row in range(batch):
        best_seq, best = exhaustive_best(log_probs_np, row, max_steps, alpha)
        assert strip(tokens[row, 0]) == best_seq
        np.testing.assert_allclose(scores[row, 0], best, rtol=1e-5)
        np.testing.assert_allclose(logps[row, 0], sequence_logp(log_probs_np, row, best_seq), rtol=1e-5)
        assert np.all(np.diff(np.asarray(scores[row])) <= 1e-6)  # n-best sorted


def test_beam_beats_greedy_where_greedy_is_myopic():
    # From BOS: "a" 0.6, "b" 0.4; after "a" everything is flat, after "b" EOS is almost sure.
    logp = np.full((V, V), -30.0, np.float32)
    logp[BOS, [4, 5]] = np.log([0.6, 0.4])
    logp[4, [EOS, 4, 5]] = np.log(1 / 3)
    logp[5, [EOS, 4, 5]] = np.log([0.98, 0.01, 0.01])
    table = jnp.asarray(logp)

    def fn(ids, cache):
        return table[ids], cache

    tokens, score = greedy_search(fn, init_cache(1), batch_size=1, max_steps=4, bos_id=BOS, eos_id=EOS)
    assert strip(tokens[0])[0] == 4
    btoks, bscores, blogp = beam_search(fn, expand_to_beams(init_cache(1), 2), batch_size=1, beam_size=2, max_steps=4,
                                        bos_id=BOS, eos_id=EOS, alpha=0.0)
    assert strip(btoks[0, 0]) == [5, EOS]
    np.testing.assert_allclose(blogp[0, 0], np.log(0.4 * 0.98), rtol=1e-5)
    assert blogp[0, 0] > score[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_beam_one_equals_greedy(seed):
    batch, max_steps = 8, 7
    log_probs_np, make_fn = chain(seed, batch)
    max_lens = jnp.asarray(np.random.default_rng(seed).integers(2, max_steps + 1, batch), jnp.int32)
    g_tok, g_score = jax.jit(lambda c: greedy_search(make_fn(1), c, batch_size=batch, max_steps=max_steps,
                                                     bos_id=BOS, eos_id=EOS, max_lens=max_lens))(init_cache(batch))
    b_tok, _, b_logp = jax.jit(lambda c: beam_search(make_fn(1), c, batch_size=batch, beam_size=1,
                                                     max_steps=max_steps, bos_id=BOS, eos_id=EOS, alpha=0.0,
                                                     max_lens=max_lens))(init_cache(batch))
    np.testing.assert_array_equal(b_tok[:, 0], g_tok)
    np.testing.assert_allclose(b_logp[:, 0], g_score, rtol=1e-6)


def test_hypotheses_end_at_eos_within_their_length_limit():
    batch, max_steps, beam = 5, 9, 4
    _, make_fn = chain(7, batch)
    max_lens = jnp.array([1, 2, 3, 9, 5], jnp.int32)
    tokens, scores, _ = beam_search(make_fn(beam), expand_to_beams(init_cache(batch), beam), batch_size=batch, beam_size=beam,
                                    max_steps=max_steps, bos_id=BOS, eos_id=EOS, max_lens=max_lens, nbest=beam)
    g_tokens, _ = greedy_search(make_fn(1), init_cache(batch), batch_size=batch, max_steps=max_steps,
                                bos_id=BOS, eos_id=EOS, max_lens=max_lens)
    for row in range(batch):
        for hyp in list(np.asarray(tokens[row])) + [np.asarray(g_tokens[row])]:
            ids = [int(t) for t in hyp]
            end = ids.index(EOS)  # every hypothesis has an EOS...
            assert end + 1 <= int(max_lens[row])  # ...within its limit
            assert all(t == PAD for t in ids[end + 1 :])  # ...and nothing after it
            assert PAD not in ids[:end] and BOS not in ids[:end]
        assert np.isfinite(scores[row, 0])
        # n-best entries beyond what the limit allows are marked -inf (row 0 allows only [EOS]).
        assert np.isfinite(np.asarray(scores[row])).sum() == (1 if row == 0 else beam)


def test_simultaneous_endings_keep_all_finished():
    # Every continuation of the first token ends with EOS next: all beams finish at step 2.
    logp = np.full((V, V), -30.0, np.float32)
    logp[BOS, [4, 5, 1]] = np.log([0.5, 0.3, 0.2])
    logp[[4, 5, 1], EOS] = 0.0
    table = jnp.asarray(logp)
    tokens, _, logps = beam_search(lambda ids, c: (table[ids], c), expand_to_beams(init_cache(1), 3), batch_size=1, beam_size=3,
                                   max_steps=5, bos_id=BOS, eos_id=EOS, alpha=0.0, nbest=3)
    assert [strip(t) for t in tokens[0]] == [[4, EOS], [5, EOS], [1, EOS]]
    np.testing.assert_allclose(logps[0], np.log([0.5, 0.3, 0.2]), rtol=1e-5)


def test_early_exit_stops_the_loop():
    logp = np.full((V, V), -30.0, np.float32)
    logp[:, EOS] = 0.0  # EOS at once, everywhere
    table = jnp.asarray(logp)
    calls = lambda ids, c: (table[ids], {"count_a": c["count_a"], "step": c["step"] + 1})  # noqa: E731
    # The cache is internal, so count steps through a host-visible side channel: the loop trip
    # count equals the number of steps the tokens show (1: the EOS).
    tokens, _ = greedy_search(calls, init_cache(2), batch_size=2, max_steps=50, bos_id=BOS, eos_id=EOS)
    assert strip(tokens[0]) == [EOS]
    steps = []

    def counting(ids, c):
        jax.debug.callback(lambda: steps.append(1))
        return calls(ids, c)

    beam_search(counting, expand_to_beams(init_cache(2), 2), batch_size=2, beam_size=2, max_steps=50, bos_id=BOS, eos_id=EOS)
    jax.effects_barrier()
    assert len(steps) <= 4, f"beam search ran {len(steps)} steps for an EOS-only chain"


def test_expand_to_beams_keeps_scalars():
    tree = {"x": jnp.arange(6).reshape(3, 2), "i": jnp.int32(4)}
    out = expand_to_beams(tree, 2)
    assert out["x"].shape == (6, 2) and out["i"].shape == ()
    np.testing.assert_array_equal(out["x"][:, 0], [0, 0, 2, 2, 4, 4])


def _sample(make_fn, batch, max_steps, keys, **kw):
    sampler = make_sampler(**kw)
    return jax.jit(lambda c, k: greedy_search(make_fn(1), c, batch_size=batch, max_steps=max_steps, bos_id=BOS,
                                              eos_id=EOS, sampler=sampler, keys=k))(init_cache(batch), keys)


def test_sampling_top1_is_greedy_and_a_seed_repeats():
    batch, max_steps = 16, 8
    _, make_fn = chain(4, batch)
    keys = jax.random.split(jax.random.key(0), batch)
    keys = jax.random.key_data(keys)
    g_tok, g_score = greedy_search(make_fn(1), init_cache(batch), batch_size=batch, max_steps=max_steps,
                                   bos_id=BOS, eos_id=EOS)
    t1, s1 = _sample(make_fn, batch, max_steps, keys, top_k=1)
    np.testing.assert_array_equal(t1, g_tok)
    np.testing.assert_allclose(s1, g_score, rtol=1e-6)
    a, _ = _sample(make_fn, batch, max_steps, keys, temperature=1.5)
    b, _ = _sample(make_fn, batch, max_steps, keys, temperature=1.5)
    np.testing.assert_array_equal(a, b)  # same keys, same draws
    other = jax.random.key_data(jax.random.split(jax.random.key(1), batch))
    c, _ = _sample(make_fn, batch, max_steps, other, temperature=1.5)
    assert not np.array_equal(a, c)  # another seed draws otherwise
    assert not np.array_equal(a, g_tok)  # and sampling is not greedy


@pytest.mark.parametrize("kw", [{"top_k": 2}, {"top_p": 0.6}, {"top_p": 0.9, "temperature": 2.0}])
def test_sampled_tokens_stay_inside_top_k_or_nucleus(kw):
    batch, max_steps = 64, 6
    log_probs_np, make_fn = chain(5, 1)
    make_rows = lambda n: chain(5, 1)[1](n)  # noqa: E731 (one chain, one row per sample)
    keys = jax.random.key_data(jax.random.split(jax.random.key(3), batch))
    tokens, scores = _sample(make_rows, batch, max_steps, keys, **kw)
    tokens = np.asarray(tokens)
    seen_outside_greedy, room = False, 0
    for row in range(batch):
        prev, count = BOS, 0
        total = 0.0
        for tok in tokens[row]:
            if tok == PAD:
                break
            logp = log_probs_np(0, prev, count) / kw.get("temperature", 1.0)
            logp = logp - np.logaddexp.reduce(logp)
            order = np.argsort(-logp, kind="stable")
            if "top_k" in kw:
                allowed = set(order[: kw["top_k"]].tolist())
            else:
                mass = np.cumsum(np.exp(logp[order])) - np.exp(logp[order])
                allowed = set(order[mass < kw["top_p"]].tolist())
            assert int(tok) in allowed, f"row {row}: token {tok} outside {sorted(allowed)}"
            seen_outside_greedy |= int(tok) != int(order[0])
            room += len(allowed) > 1
            total += log_probs_np(0, prev, count)[tok]
            count += prev == 4
            prev = int(tok)
        np.testing.assert_allclose(scores[row], total, rtol=1e-5)  # the model's own log-prob
    assert room < 20 or seen_outside_greedy  # where the filter leaves room, other tokens are drawn


@pytest.mark.parametrize("beam", [1, 3])
def test_forced_prefix_starts_every_hypothesis(beam):
    batch, max_steps = 4, 7
    log_probs_np, make_fn = chain(6, batch)
    prefix = jnp.array([[5, 5, 4], [4, 0, 0], [0, 0, 0], [5, 4, 5]], jnp.int32)
    prefix_lens = jnp.array([3, 1, 0, 2], jnp.int32)
    kw = dict(batch_size=batch, max_steps=max_steps, bos_id=BOS, eos_id=EOS)
    if beam == 1:
        free, free_scores = greedy_search(make_fn(1), init_cache(batch), **kw)
        tokens, scores = greedy_search(make_fn(1), init_cache(batch), prefix=prefix, prefix_lens=prefix_lens, **kw)
        free, tokens, free_scores, scores = free[:, None], tokens[:, None], free_scores[:, None], scores[:, None]
    else:
        cache = expand_to_beams(init_cache(batch), beam)
        free, free_scores, _ = beam_search(make_fn(beam), cache, beam_size=beam, nbest=beam, **kw)
        tokens, scores, logps = beam_search(make_fn(beam), cache, beam_size=beam, nbest=beam, prefix=prefix,
                                            prefix_lens=prefix_lens, **kw)
    for row in range(batch):
        n = int(prefix_lens[row])
        for hyp in np.asarray(tokens[row]):
            assert list(hyp[:n]) == list(np.asarray(prefix[row, :n]))  # verbatim, at the start
        if beam > 1:
            for hyp, lp in zip(np.asarray(tokens[row]), np.asarray(logps[row])):
                np.testing.assert_allclose(lp, sequence_logp(log_probs_np, row, strip(hyp)), rtol=1e-5)
    np.testing.assert_array_equal(tokens[2], free[2])  # an empty prefix changes nothing
    np.testing.assert_allclose(scores[2], free_scores[2], rtol=1e-6)
    assert not np.array_equal(tokens[0], free[0])  # a real prefix does change the search


def test_banned_ids_are_never_emitted_but_scores_stay_model_log_probs():
    logp = np.full((V, V), -30.0, np.float32)
    logp[:, PAD] = np.log(0.7)  # padding is the most likely token everywhere
    logp[:, [EOS, 4]] = np.log([0.1, 0.2])
    table = jnp.asarray(logp)
    fn = lambda ids, c: (table[ids], c)  # noqa: E731
    tokens, score = greedy_search(fn, init_cache(1), batch_size=1, max_steps=3, bos_id=BOS, eos_id=EOS,
                                  banned_ids=(PAD, BOS), max_lens=jnp.array([3]))
    assert strip(tokens[0]) == [4, 4, EOS]  # the best allowed token, then EOS at the limit
    np.testing.assert_allclose(score[0], np.log(0.2) * 2 + np.log(0.1), rtol=1e-5)
    btoks, _, blogp = beam_search(fn, expand_to_beams(init_cache(1), 2), batch_size=1, beam_size=2, max_steps=3,
                                  bos_id=BOS, eos_id=EOS, alpha=0.0, banned_ids=(PAD, BOS))
    assert PAD not in strip(btoks[0, 0])[:-1] and strip(btoks[0, 0])[-1] == EOS


@pytest.mark.parametrize("size,k", [(32000, 8), (8003, 2), (4000, 16), (100, 3)])
def test_chunked_top_k_and_argmax_equal_lax_on_ties_and_masks(size, k):
    """Few distinct values (many ties), masked (NEG_INF) and -inf rows: the chunked top-k gives
    lax.top_k's values and indices exactly (lowest index first among ties), and first_argmax
    gives jnp.argmax's index, banned ids excluded (even where one holds the maximum)."""
    rng = np.random.default_rng(size + k)
    ties = rng.integers(0, 5, size=(12, size)).astype(np.float32)
    normal = rng.normal(size=(12, size)).astype(np.float32)
    for x in (ties, normal):
        x[0] = -1.0e9
        x[1, : size // 2] = -np.inf
        x[2, -1] = 100.0  # the best entry in the last (padded) chunk
        want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
        got_v, got_i = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
        np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))
        banned_ids = (0, 3, 37)  # in the first two chunks
        masked = x.copy()
        masked[:, banned_ids] = -np.inf
        x[3, 37] = 1e6  # a banned id holds the maximum
        got = jax.jit(first_argmax, static_argnums=1)(jnp.asarray(x), banned_ids)
        np.testing.assert_array_equal(np.asarray(got), np.argmax(masked, axis=-1))


@pytest.mark.parametrize("vocab", [512, 300])  # chunked (512 = 16 chunks of 32) and fallback paths
def test_beam_extension_top_k_equals_full_log_softmax_top_k(vocab):
    """The search's chunked scoring (each chunk's best score from its best allowed logit under
    length limits, banned ids and forced prefixes; kept chunks scored in full) picks the
    extensions that lax.top_k picks over the full, stored [batch, beam * V] scores, ties included."""
    from transformer_mt.decode import NEG_INF, _banned, _extension_scores, _top_extensions

    rng = np.random.default_rng(vocab)
    batch, beam, k = 6, 4, 8
    logits = rng.integers(-8, 8, size=(batch, beam, vocab)).astype(np.float32) / 4  # many ties
    logits[1, 1] = logits[1, 0]  # two beams alike, at the same alive score: ties across beams
    alive = rng.normal(size=(batch, beam)).astype(np.float32)
    alive[1, 1] = alive[1, 0]
    alive[0, 1:] = NEG_INF  # the first step: one live beam
    # Row 4: one best token in chunk 3, then ties at 1.0 in chunks 0 and 3: the lower indices win.
    logits[4, 0] = 0.0
    logits[4, 0, 96], logits[4, 0, 97:104], logits[4, 0, 8:15] = 5.0, 1.0, 1.0
    alive[4, 1:] = NEG_INF
    step = 3
    max_lens = np.full((batch * beam,), 10, np.int32)
    max_lens[5:9] = step + 1  # at the length limit: EOS only
    prefix = np.zeros((batch * beam, 5), np.int32)
    prefix_lens = np.zeros((batch * beam,), np.int32)
    prefix[12:16, step], prefix_lens[12:16] = 7, 5  # forced to token 7 at this step
    banned_ids = (0, 2, 45)  # in chunks 0 and 1
    logits[2] = rng.normal(size=(beam, vocab))  # no ties; banned ids hold every beam's maximum
    logits[2, :, [0, 45]] = 9.0

    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    ids = jnp.arange(vocab)
    allowed = ~(step + 1 >= max_lens)[:, None] | (ids == EOS)
    allowed = allowed & ~jnp.isin(ids, jnp.array(banned_ids))
    allowed = jnp.where((step < prefix_lens)[:, None], ids == prefix[:, step][:, None], allowed)
    full = alive[:, :, None] + jnp.where(allowed.reshape(batch, beam, vocab), logp, NEG_INF)
    want_v, want_i = jax.lax.top_k(full.reshape(batch, -1), k)

    @jax.jit
    def fused(logits, alive):
        rows, score, chunk_best = _extension_scores(logits, alive, jnp.int32(step), EOS, jnp.asarray(max_lens),
                                                    jnp.asarray(prefix), jnp.asarray(prefix_lens), banned_ids)
        return _top_extensions(logits, rows, score, chunk_best, _banned(vocab, banned_ids), k)

    got_v, got_i = fused(jnp.asarray(logits), jnp.asarray(alive))
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(got_v), np.asarray(want_v), atol=1e-5)
