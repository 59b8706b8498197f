"""The fast search (cross keys/values once per sentence, beam cache never moved, batches sized
to the work) against a reference that recomputes the whole prefix every step, and against itself
in batches of every composition."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings as hsettings, strategies as st

from transformer_mt import decode as decode_lib
from transformer_mt import rundir
from transformer_mt import decode_batches
from transformer_mt import search
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID

SENTENCES = [
    "A man .",
    "Two dogs play in the snow .",
    "A woman in a red dress walks .",
    "Kids play .",
    "A man is riding a bike .",
    "A dog runs .",
    "Two men sit on a bench in the park .",
    "A girl .",
]


@pytest.fixture(scope="module")
def run(trained_run):
    cfg, graphdef, params, tok, step, mesh = rundir.load_run(trained_run)
    return cfg, graphdef, params, tok, search.Translator(cfg, graphdef, tok, mesh)


def reference_search(graphdef, params, src, beam, max_steps, nbest, alpha):
    """Beam or greedy search whose cache is the token history itself, reordered row by row with
    the default gather, each step re-running the teacher-forcing decoder over the whole prefix."""
    model = nnx.merge(graphdef, params)
    encoded, src_mask = model.encode(src)
    encoded, src_mask = decode_lib.expand_to_beams((encoded, src_mask), beam)
    rows = encoded.shape[0]

    def tokens_to_logits(ids, cache):
        history = jax.lax.dynamic_update_slice(cache["history"], ids[:, None], (0, cache["index"]))
        logits = model.decode(history, encoded, src_mask)  # [rows, T, V]
        now = jax.lax.dynamic_index_in_dim(logits, cache["index"], axis=1, keepdims=False)
        return now, {"history": history, "index": cache["index"] + 1}

    cache = {"history": jnp.full((rows, max_steps), PAD_ID, jnp.int32), "index": jnp.int32(0)}
    batch = src.shape[0]
    max_lens = jnp.full((batch,), max_steps, jnp.int32)
    if beam == 1:
        tokens, scores = decode_lib.greedy_search(tokens_to_logits, cache, batch_size=batch, max_steps=max_steps,
                                                  bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_lens=max_lens,
                                                  banned_ids=(PAD_ID, BOS_ID))
        return tokens[:, None], scores[:, None]
    tokens, scores, _ = decode_lib.beam_search(tokens_to_logits, cache, batch_size=batch, beam_size=beam,
                                               max_steps=max_steps, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                                               alpha=alpha, nbest=nbest, max_lens=max_lens, banned_ids=(PAD_ID, BOS_ID))
    return tokens, scores


@pytest.mark.parametrize("beam,nbest", [(1, 1), (4, 4)])
def test_fast_search_equals_recomputing_reference(run, beam, nbest):
    cfg, graphdef, params, tok, _ = run
    ids = tok.encode_src(SENTENCES)
    length = max(map(len, ids))
    src = np.full((len(ids), length), PAD_ID, np.int32)
    for r, seq in enumerate(ids):
        src[r, : len(seq)] = seq
    max_steps = 12
    fast = search.compiled_search(graphdef, beam, 0.6, nbest, max_steps)
    n = len(ids)
    no_prefix = np.zeros((n, 0), np.int32)
    tokens, scores = fast(params, src, np.full((n,), max_steps, np.int32), no_prefix, np.zeros((n,), np.int32),
                          np.arange(n, dtype=np.int32), np.uint32(0))
    ref_tokens, ref_scores = jax.jit(lambda p, s: reference_search(graphdef, p, s, beam, max_steps, nbest, 0.6))(
        params, src)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=1e-5)
    assert np.any(np.asarray(tokens) == EOS_ID)  # the trained model ends its hypotheses: endings are tested


@pytest.mark.parametrize("beam", [1, 4])
def test_sentence_alone_equals_sentence_in_any_batch(run, beam):
    """Row count, source padding and neighbours change nothing: same tokens, same scores."""
    cfg, graphdef, params, tok, translator = run
    ids = tok.encode_src(SENTENCES)
    settings = search.settings_from(cfg, beam_size=beam, nbest=min(beam, 2))
    alone = [translator.translate_ids(params, [seq], settings)[0] for seq in ids]
    rng = np.random.default_rng(beam)
    order = rng.permutation(len(ids))
    mixed = [ids[i] for i in order] + ids[:3]  # shuffled, with duplicates: other rows, other neighbours
    compositions = {
        "one batch": translator.translate_ids(params, mixed, settings),
        "small batches": translator.translate_ids(params, mixed, dataclasses.replace(settings, batch_tokens=40)),
    }
    for name, results in compositions.items():
        for k, i in enumerate(list(order) + [0, 1, 2]):
            for (got_ids, got_score), (want_ids, want_score) in zip(results[k], alone[i]):
                assert got_ids == want_ids, f"{name}: sentence {i} decoded differently in a batch"
                assert got_score == pytest.approx(want_score, abs=1e-4), name


def test_compiled_programs_are_bounded_for_mixed_lengths(run):
    cfg, graphdef, params, tok, _ = run
    buckets = [4, 8, 12, 16]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, bucket_lengths=buckets))
    translator = search.Translator(cfg, graphdef, tok)
    rng = np.random.default_rng(0)
    words = "a man dog runs in the park with two red kids play snow".split()
    lines = [" ".join(rng.choice(words, rng.integers(1, 14))) for _ in range(150)]
    settings = search.settings_from(cfg, beam_size=1, batch_tokens=128, max_len_a=0.0, max_len_b=6)
    fn = translator.search_for(settings, buckets[0]).jitted  # max_len_a 0: one step limit for every bucket
    before = fn._cache_size()
    out = translator.translate_lines(params, lines, settings, progress=False)
    assert len(out) == len(lines)
    ids = [translator._fit(s) for s in tok.encode_src(lines)]
    lengths = sorted(len(s) for s in ids if len(s) > 1)
    shapes = {(length, rows) for length, rows, _ in decode_batches.plan_batches(lengths, translator.buckets, 128)}
    programs = fn._cache_size() - before
    assert programs <= len(shapes) <= 12, f"{programs} programs for {len(lines)} lines of mixed lengths"


@pytest.mark.parametrize("train, want", [([8, 12, 16, 20, 24, 28, 32, 40, 48, 64], (16, 32, 64)),
                                         ([16, 24, 32, 48, 64, 96, 128, 192, 256], (16, 32, 64, 128, 256)),
                                         ([4, 8, 12], (12,)), ([10, 20, 30, 40, 100], (20, 40, 100)),
                                         ([16, 17, 100], (16, 17, 100))])
def test_decoding_pads_to_a_doubling_ladder_of_training_buckets(train, want):
    assert decode_batches.decoding_buckets(train) == want
    for length in range(1, train[-1] + 1):  # every sentence training could see still fits, at most 2x padded
        padded = decode_batches.bucket_for(length, want)
        assert padded in train and length <= padded
        assert padded == decode_batches.bucket_for(length, train) or padded <= max(2 * length, want[0])


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=300), st.sampled_from([64, 256, 1024, 4096]),
       st.sampled_from([1, 2, 4]), st.booleans())
def test_batch_plan_is_tight_and_complete(lengths, batch_tokens, multiple, one_bucket):
    lengths = sorted(lengths)
    buckets = [8, 16, 24, 32, 40]
    plan = decode_batches.plan_batches(lengths, buckets, batch_tokens, multiple, one_bucket=one_bucket)
    assert sorted(i for _, _, chunk in plan for i in chunk) == list(range(len(lengths)))
    for length, rows, chunk in plan:
        assert length == decode_batches.bucket_for(lengths[chunk[-1]], buckets)  # the longest's bucket
        if one_bucket:  # every sentence is padded to its own bucket, whatever its neighbours
            assert all(decode_batches.bucket_for(lengths[i], buckets) == length for i in chunk)
        assert rows >= len(chunk) and rows % multiple == 0 and rows >= 2 * multiple
        assert rows == -(-max(decode_batches.row_bucket(len(chunk)), 2 * multiple) // multiple) * multiple
        if multiple == 1 and len(chunk) > 1:
            assert 3 * (rows - len(chunk)) <= rows  # at most a third of a batch is padding
        assert len(chunk) == 1 or len(chunk) * length <= batch_tokens
    # tight: a batch ends only where the budget is full (or, one_bucket, where the bucket changes)
    for (length, _, chunk), (next_length, _, _) in zip(plan, plan[1:]):
        assert (next_length != length and one_bucket) or (len(chunk) + 1) * next_length > batch_tokens


def test_cli_sampling_and_prefixes(trained_run, tmp_path):
    from conftest import cli_here

    src = tmp_path / "src.en"
    src.write_text("A man is riding a bike .\nTwo dogs play in the snow .\nKids play .\n", encoding="utf-8")
    run = ["translate", "--checkpoint", str(trained_run), "-i", str(src), "--no-progress"]

    def out(*extra):
        r = cli_here(*run, *extra)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode().splitlines()

    greedy = out("--beam", "1")
    assert out("--sampling", "topk:1") == greedy  # top-1 sampling is greedy
    draws = out("--sampling", "topp:0.95", "--temperature", "1.5", "--seed", "7", "--nbest", "4")
    assert len(draws) == 3 * 4
    assert out("--sampling", "topp:0.95", "--temperature", "1.5", "--seed", "7", "--nbest", "4") == draws
    assert out("--sampling", "topp:0.95", "--temperature", "1.5", "--seed", "8", "--nbest", "4") != draws
    scores = [float(line.split(" ||| ")[2]) for line in draws]
    assert all(a >= b for a, b in zip(scores[:4], scores[1:4]))  # best draw first

    prefixes = tmp_path / "prefix.de"
    prefixes.write_text("Ein Hund\n\nZwei\n", encoding="utf-8")
    for extra in (["--beam", "1"], ["--beam", "4", "--nbest", "2"]):
        forced = out(*extra, "--prefix", str(prefixes))
        free = out(*extra)
        texts = [line.split(" ||| ")[1] if " ||| " in line else line for line in forced]
        per_line = len(texts) // 3
        for k, text in enumerate(texts):
            assert text.startswith(["Ein Hund", "", "Zwei"][k // per_line]), text
        assert forced[per_line : 2 * per_line] == free[per_line : 2 * per_line]  # an empty prefix changes nothing

    short = tmp_path / "short.de"
    short.write_text("Ein\n", encoding="utf-8")
    for extra, fragment in ((["--prefix", str(short)], "fewer lines"), (["--sampling", "top:3"], "--sampling must")):
        r = cli_here(*run, *extra)
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and fragment in err and len(err.splitlines()) == 1, err


def test_score_of_a_greedy_translation_is_its_search_score(run):
    """Teacher forcing (teacher_forcing.py) and incremental decoding (this search) are two
    computations of the same log-probability."""
    cfg, graphdef, params, tok, translator = run
    ids = tok.encode_src(SENTENCES)
    greedy = translator.translate_ids(params, ids, search.settings_from(cfg, beam_size=1))
    total, _ = translator.score_ids(params, ids, [h[0][0] for h in greedy])
    np.testing.assert_allclose(total, [h[0][1] for h in greedy], atol=1e-4)


def test_greedy_without_scores_finds_the_same_tokens(run):
    """translate skips greedy scores unless --nbest prints them: the search must not change."""
    cfg, graphdef, params, tok, translator = run
    settings = search.settings_from(cfg, beam_size=1)
    for prefixes in (None, ["Ein"] * len(SENTENCES)):
        scored = translator.translate_lines(params, SENTENCES, settings, prefixes=prefixes)
        bare = translator.translate_lines(params, SENTENCES, dataclasses.replace(settings, scores=False),
                                          prefixes=prefixes)
        assert [h[0][0] for h in bare] == [h[0][0] for h in scored]
        assert all(h[0][1] == 0.0 for h in bare) and all(h[0][1] < 0.0 for h in scored)
