"""The chunked, fused output projection + loss equals the plain one: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_mt.losses import correct_tokens, label_smoothed_xent, projected_label_smoothed_xent


def _plain(features, embedding, targets, weights, smoothing):
    logits = jnp.dot(features, embedding.T, preferred_element_type=jnp.float32)
    loss, nll = label_smoothed_xent(logits, targets, weights, smoothing)
    return loss, (nll, correct_tokens(logits, targets, weights))


@pytest.mark.parametrize("n,chunk", [(64, 16), (50, 16), (12, 256)])  # whole chunks, a padded last one, one chunk
def test_projected_loss_and_gradients_equal_plain_ones(n, chunk):
    rng = np.random.default_rng(n)
    vocab, dim, smoothing = 96, 8, 0.1
    features = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    embedding = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=n), jnp.int32)
    weights = jnp.asarray(rng.random(n) > 0.2)  # padding positions weigh nothing
    targets = targets.at[3].set(int(jnp.argmax(features[3] @ embedding.T)))  # one sure hit for accuracy

    def fused(f, e):
        loss, nll, correct = projected_label_smoothed_xent(f, e, targets, weights, smoothing, chunk=chunk)
        return loss, (nll, correct)

    (want, (want_nll, want_correct)), want_grads = jax.value_and_grad(_plain, argnums=(0, 1), has_aux=True)(
        features, embedding, targets, weights, smoothing)
    (got, (got_nll, got_correct)), got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(
        features, embedding)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
    assert float(got_correct) == float(want_correct) >= 1
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    # Without jax.grad the forward alone gives the same sums.
    np.testing.assert_allclose(jax.jit(fused)(features, embedding)[0], want, rtol=1e-5)
