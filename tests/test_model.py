"""Model properties: padding is invisible, decoding is causal, cached steps equal the full pass."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_mt.config import ModelConfig
from transformer_mt import layer_norm, matmul
from transformer_mt.model import Residual, Transformer, dropout, keep_mask

V = 40
SRC = np.array([[5, 6, 7, 8, 3, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 3]], np.int32)
TGT = np.array([[2, 20, 21, 22, 23, 24], [2, 25, 26, 27, 28, 29]], np.int32)


def make(positional="sinusoidal", pre_norm=True, tie=True):
    cfg = ModelConfig(d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64,
                      dropout=0.1, positional=positional, pre_norm=pre_norm, tie_embeddings=tie,
                      dtype="float32", matmul_dtype="float32")
    return Transformer(cfg, V, V, nnx.Rngs(0))


VARIANTS = [("sinusoidal", True, True), ("rotary", False, False)]
# The tests run the models eagerly on the same few shapes: XLA compiles each primitive once per
# shape and every test reuses it, which costs less than compiling whole programs per test.


@pytest.fixture(scope="module", params=VARIANTS, ids=["sinusoidal-prenorm-tied", "rotary-postnorm-untied"])
def model(request):
    return make(*request.param)


def test_padding_does_not_change_outputs(model):
    logits = model(SRC, TGT)
    # Same sentences with four more pad columns: identical outputs.
    padded = np.pad(SRC, ((0, 0), (0, 4)))
    np.testing.assert_allclose(model(padded, TGT), logits, atol=1e-5)
    # Garbage under an explicit mask is never attended to.
    mask = SRC != 0
    junk = np.where(mask, SRC, 17)
    enc_a, _ = model.encode(SRC, src_mask=mask)
    enc_b, _ = model.encode(junk, src_mask=mask)
    np.testing.assert_allclose(model.decode(TGT, enc_b, mask), model.decode(TGT, enc_a, mask), atol=1e-5)
    np.testing.assert_allclose(enc_b[0, :5], enc_a[0, :5], atol=1e-5)
    assert not np.allclose(enc_b[0, 5:], enc_a[0, 5:], atol=1e-3)  # the junk did go in (the test can fail)


def test_decoder_is_causal(model):
    logits = model(SRC, TGT)
    for i in range(TGT.shape[1] - 1):
        changed = TGT.copy()
        changed[:, i + 1 :] = 33  # every token after position i
        np.testing.assert_allclose(model(SRC, changed)[:, : i + 1], logits[:, : i + 1], atol=1e-5)
    # ...while position i does see token i (the test can fail).
    changed = TGT.copy()
    changed[:, 2] = 33
    assert not np.allclose(model(SRC, changed)[:, 2], logits[:, 2], atol=1e-3)


@pytest.mark.parametrize("use_jit", [False, True])
def test_cached_decoding_equals_full_forward(model, use_jit):
    full = model(SRC, TGT)  # [B, T, V]
    graphdef, params = nnx.split(model)

    def steps(params):
        m = nnx.merge(graphdef, params)
        enc, mask = m.encode(SRC)
        cross = m.cross_state(enc, mask)
        cache = m.init_cache(SRC.shape[0], 1, 8)  # longer than the target: unused slots must be masked
        out = []
        for t in range(TGT.shape[1]):
            logits, cache = m.decode_step(jnp.asarray(TGT[:, t]), cache, cross)
            out.append(logits)
        return jnp.stack(out, axis=1)

    stepped = (jax.jit(steps) if use_jit else steps)(params)
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=1e-5)


def test_dropout_only_with_rngs_and_tied_embeddings():
    model = make()
    a = model(SRC, TGT)
    np.testing.assert_array_equal(model(SRC, TGT), a)  # no rngs: deterministic
    assert not np.allclose(model(SRC, TGT, rngs=nnx.Rngs(dropout=1)), a)
    params = nnx.state(model, nnx.Param)
    names = {"/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(params)}
    assert any(n.startswith("src_embed") for n in names)
    assert not any(n.startswith(("tgt_embed", "output")) for n in names)  # shared, stored once
    untied = make(tie=False)
    names = {"/".join(str(k) for k in p) for p, _ in nnx.to_flat_state(nnx.state(untied, nnx.Param))}
    assert any(n.startswith("output") for n in names) and any(n.startswith("tgt_embed") for n in names)


@pytest.mark.parametrize("steps,cache_len,blocked", [(5, 7, False), (9, 13, True)], ids=["one-buffer", "blocks"])
def test_beam_cache_follows_parents_without_moving_entries(model, steps, cache_len, blocked):
    """Three hypotheses per sentence share one cache buffer (or, for a longer cache, its blocks
    of 4 positions, of which a step reads only those filled so far); after each step they are
    reordered (parents) and fed different tokens. Each hypothesis' logits must equal the full
    forward pass of its own token history, so attention reads exactly its ancestors' entries."""
    beams = 3
    assert isinstance(model.init_cache(1, beams, cache_len)["layers"][0]["k"], tuple) == blocked
    rng = np.random.default_rng(1)
    graphdef, params = nnx.split(model)
    batch = SRC.shape[0]
    parents = rng.integers(0, beams, (steps, batch, beams))
    tokens = rng.integers(4, V, (steps, batch, beams))
    tokens[0] = 2  # BOS for every hypothesis

    def run(params):
        m = nnx.merge(graphdef, params)
        enc, mask = m.encode(SRC)
        cache = m.init_cache(batch, beams, cache_len)
        cross = m.cross_state(enc, mask)
        out = []
        for t in range(steps):
            if t:
                cache = m.reorder_cache(cache, jnp.asarray(parents[t]))
            logits, cache = m.decode_step(jnp.asarray(tokens[t].reshape(-1)), cache, cross)
            out.append(logits.reshape(batch, beams, -1))
        return out

    out = jax.jit(run)(params)
    # Rebuild each hypothesis' history by following the parents backwards.
    for t in range(steps):
        for b in range(batch):
            for j in range(beams):
                history, slot = [], j
                for u in range(t, -1, -1):
                    history.append(tokens[u, b, slot])
                    if u:
                        slot = parents[u, b, slot]
                history = np.array(history[::-1])[None]
                full = model(SRC[b : b + 1], history)[0, -1]
                np.testing.assert_allclose(out[t][b, j], full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rate,shape", [(0.3, (64, 33, 128)), (0.1, (3, 5, 7)), (0.5, (1,))])
def test_dropout_mask_rate_expectation_and_determinism(rate, shape):
    """The hashed mask: the kept share matches 1 - rate (4 standard errors), the kept values are
    rescaled by the exact keep probability (mean preserved), and a key repeats its mask."""
    key = jax.random.key(7)
    keep, prob = keep_mask(key, 1.0 - rate, shape)
    assert keep.shape == shape and abs(prob - (1.0 - rate)) < 2.0**-31
    n = int(np.prod(shape))
    assert abs(float(keep.mean()) - (1.0 - rate)) <= 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9
    np.testing.assert_array_equal(keep_mask(key, 1.0 - rate, shape)[0], keep)
    x = jnp.ones(shape)
    out = np.asarray(dropout(x, rate, nnx.Rngs(dropout=7)))
    kept = out[out != 0]
    np.testing.assert_allclose(kept, 1.0 / prob, rtol=1e-6)


def test_dropout_masks_look_independent():
    """Neighbouring positions, rows, and the masks of two keys (e.g. consecutive steps) agree as
    often as independent draws would (p^2 + (1-p)^2, within 5 standard errors), and every row
    and column keeps its share: no structure for the model to learn from."""
    p, shape = 0.7, (256, 512)
    a = np.asarray(keep_mask(jax.random.key(1), p, shape)[0])
    b = np.asarray(keep_mask(jax.random.fold_in(jax.random.key(1), 1), p, shape)[0])
    agree = p * p + (1 - p) * (1 - p)
    for x, y in ((a[:, 1:], a[:, :-1]), (a[1:], a[:-1]), (a, b)):
        se = np.sqrt(agree * (1 - agree) / x.size)
        assert abs(float((x == y).mean()) - agree) < 5 * se
    for axis, n in ((0, shape[0]), (1, shape[1])):
        share = a.mean(axis=axis)
        assert np.all(np.abs(share - p) < 6 * np.sqrt(p * (1 - p) / n))


def test_packed_rows_equal_padded_rows(model):
    """Pairs packed several to a row (segment ids, positions per pair) give the loss and gradients
    of the same pairs padded one to a row: nothing leaks between the pairs of a row."""
    from transformer_mt import data as data_lib
    from transformer_mt import train_step as ts

    rng = np.random.default_rng(0)
    src = [np.append(rng.integers(4, V, size=n), 3).astype(np.int32) for n in (3, 7, 2, 5, 4, 6)]
    tgt = [rng.integers(4, V, size=n).astype(np.int32) for n in (4, 2, 6, 3, 5, 1)]
    examples = data_lib.Examples(src, tgt)
    padded = data_lib.pad_batch(examples, np.arange(6), 6, 8)
    packed = data_lib.pack_batch(examples, [(0, 1, 2), (3, 4, 5)], 20)
    assert (packed["src_segments"].max(axis=1) == 3).all()  # three pairs share each row
    graphdef, params = nnx.split(model, nnx.Param)
    grad = jax.grad(lambda p, b: ts.batch_sums(p, graphdef, b, None, 0.1), has_aux=True)
    g_pad, m_pad = grad(params, padded)
    g_pack, m_pack = grad(params, packed)
    for k in m_pad:
        np.testing.assert_allclose(m_pack[k], m_pad[k], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The test can fail: the same rows without segment ids let the pairs see each other.
    mixed = {k: packed[k] for k in ("src", "tgt_in", "tgt_out")}
    _, m_mixed = grad(params, mixed)
    assert abs(float(m_mixed["loss_sum"]) - float(m_pad["loss_sum"])) > 1e-2


def _flax_norm(scale, bias):
    norm = nnx.LayerNorm(scale.shape[0], epsilon=1e-5, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    return norm


def test_layer_norm_forward_is_flax_and_backward_its_gradient():
    """layer_norm.layer_norm gives nnx.LayerNorm's outputs bit for bit, and the gradient of
    autodiff through nnx.LayerNorm (to float32 rounding) from its one kept activation; the model's
    residual blocks use it."""
    k = jax.random.split(jax.random.key(3), 4)
    x = 3.0 * jax.random.normal(k[0], (4, 7, 48)) + 1.5
    x = x.at[0, 0].set(2.0)  # a constant row: variance 0, the epsilon alone
    scale, bias = 1 + 0.2 * jax.random.normal(k[1], (48,)), 0.1 * jax.random.normal(k[2], (48,))
    dy = jax.random.normal(k[3], x.shape)
    ours = jax.jit(lambda x, s, b: layer_norm.layer_norm(x, s, b, 1e-5))
    theirs = jax.jit(lambda x, s, b: _flax_norm(s, b)(x))
    np.testing.assert_array_equal(ours(x, scale, bias), theirs(x, scale, bias))
    loss = lambda f: jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b) * dy), argnums=(0, 1, 2)))  # noqa: E731
    for a, b in zip(loss(ours)(x, scale, bias), loss(theirs)(x, scale, bias)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))
    cfg = ModelConfig(d_model=48, num_heads=4, dtype="float32", matmul_dtype="float32")
    block = Residual(cfg, jnp.float32, nnx.Rngs(0))
    with mock.patch.object(matmul, "layer_norm_f32", wraps=matmul.layer_norm_f32) as used:
        matmul.layer_norm(block.norm, x)
    assert used.called
