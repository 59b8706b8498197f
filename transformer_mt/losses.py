"""Label-smoothed cross entropy and token accuracy as sums over real target tokens (pure jnp).

Sums, not means: the caller divides by the number of target tokens of the whole (possibly
accumulated, possibly sharded) batch, so the loss does not depend on how it was split.
Training uses `projected_label_smoothed_xent` (the output projection fused in, chunked);
`label_smoothed_xent` and `correct_tokens` are the same math on given logits, its reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer_mt.matmul import weight_grad


def label_smoothed_xent(logits, targets, weights, smoothing: float):
    """logits [B, T, V], targets int [B, T], weights [B, T] in {0, 1}.

    Returns (loss_sum, nll_sum): loss = (1 - eps) * nll + eps * mean_v(-log p_v), the smoothing
    spread uniformly over the vocabulary (Szegedy et al., 2016), summed with the weights.
    """
    # Written with logsumexp so the [B, T, V] log-probabilities are never materialised:
    # -log p_target = lse - z_target and mean_v(-log p_v) = lse - mean_v(z_v).
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    smooth = lse - jnp.mean(logits, axis=-1)
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(nll * weights)


def correct_tokens(logits, targets, weights):
    """Number of weighted positions whose target has the highest logit (a tie counts as
    correct). Compared with the row maximum, which the loss's logsumexp already computes, rather
    than through argmax: XLA:CPU's argmax was 6% of a training step (benchmarks/RESULTS.md)."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    best = target_logit >= jnp.max(logits, axis=-1)
    return jnp.sum(best * weights.astype(jnp.float32))


def projected_label_smoothed_xent(features, embedding, targets, weights, smoothing: float, chunk: int = 256,
                                  matmul_dtype=None, kernel_transposes: bool = False):
    """label_smoothed_xent and correct_tokens of logits = features @ embedding.T, computed
    `chunk` tokens at a time so that the [tokens, V] logits are never stored whole.

    features [N, D], embedding [V, D] (the output projection), targets int [N], weights [N] in
    {0, 1}. Returns (loss_sum, nll_sum, correct). Only loss_sum is differentiable (nll_sum and
    correct are metrics). Under jax.grad the forward pass also computes the gradients: each
    chunk's logit gradient (softmax minus the smoothed target) is turned into its features'
    gradient and added into the embedding's at once, so the backward pass keeps [N, D] and
    [V, D] instead of the [N, V] logits and their softmax, and no [N, V] array (several times the
    size of the last-level cache) is read or written more than once a chunk.
    matmul_dtype (default: the features' dtype): the three matmuls' input dtype (bfloat16 for
    mixed precision, see transformer_mt.matmul); they accumulate, and the softmax runs, in float32.
    kernel_transposes: the embedding's bf16 gradient by matmul.weight_grad's kernel route.
    """
    matmul_dtype = jnp.dtype(matmul_dtype or features.dtype)
    kernel_transposes = kernel_transposes and matmul_dtype == jnp.bfloat16
    return _projected_xent(features, embedding, targets, weights.astype(jnp.float32), smoothing, chunk,
                           matmul_dtype, kernel_transposes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _projected_xent(features, embedding, targets, weights, smoothing, chunk, matmul_dtype, kernel_transposes):
    sums, _, _ = _chunked_xent(features, embedding, targets, weights, smoothing, chunk, matmul_dtype,
                               kernel_transposes, with_grads=False)
    return sums


def _projected_xent_fwd(features, embedding, targets, weights, smoothing, chunk, matmul_dtype, kernel_transposes):
    sums, d_features, d_embedding = _chunked_xent(features, embedding, targets, weights, smoothing, chunk,
                                                  matmul_dtype, kernel_transposes, with_grads=True)
    return sums, (d_features, d_embedding)


def _projected_xent_bwd(smoothing, chunk, matmul_dtype, kernel_transposes, residuals, cotangents):
    d_features, d_embedding = residuals
    g = cotangents[0]  # of loss_sum; the metrics' cotangents are ignored (see the docstring)
    return (g * d_features).astype(d_features.dtype), (g * d_embedding).astype(d_embedding.dtype), None, None


_projected_xent.defvjp(_projected_xent_fwd, _projected_xent_bwd)


def _chunked_xent(features, embedding, targets, weights, smoothing, chunk, matmul_dtype, kernel_transposes,
                  with_grads):
    """((loss_sum, nll_sum, correct), d loss_sum / d features, d loss_sum / d embedding); the
    gradients are None unless with_grads. A scan over chunks of `chunk` tokens (the last padded
    with zero-weight rows). The embedding's gradient is summed transposed, [D, V]: the chunk's
    product f^T d_logits then transposes the [chunk, D] features, not the [chunk, V] logits."""
    n, d = features.shape
    vocab = embedding.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        features = jnp.pad(features, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    xs = (features.reshape(-1, chunk, d), targets.reshape(-1, chunk), weights.reshape(-1, chunk))
    table = embedding.astype(matmul_dtype)

    def body(d_embedding, x):
        f, t, w = x
        f = f.astype(matmul_dtype)
        logits = jnp.dot(f, table.T, preferred_element_type=jnp.float32)  # [chunk, V]
        top = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - top)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        lse = (jnp.log(total) + top)[:, 0]
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        nll = lse - target_logit
        loss = (1.0 - smoothing) * nll + smoothing * (lse - jnp.mean(logits, axis=-1))
        sums = jnp.stack([jnp.sum(loss * w), jnp.sum(nll * w), jnp.sum((target_logit >= top[:, 0]) * w)])
        if not with_grads:
            return d_embedding, (sums, None)
        # d loss / d logits = softmax - (1 - smoothing) * one_hot(target) - smoothing / V, per weight.
        is_target = jnp.arange(vocab, dtype=t.dtype) == t[:, None]
        d_logits = (exp / total - jnp.where(is_target, 1.0 - smoothing, 0.0) - smoothing / vocab) * w[:, None]
        d_logits = d_logits.astype(matmul_dtype)
        d_f = jnp.dot(d_logits, table, preferred_element_type=jnp.float32).astype(features.dtype)
        d_embedding = d_embedding + weight_grad(f, d_logits, kernel_transposes)  # [D, V]
        return d_embedding, (sums, d_f)

    init = jnp.zeros(embedding.shape[::-1], jnp.float32) if with_grads else None
    d_embedding, (sums, d_features) = jax.lax.scan(body, init, xs)
    loss_sum, nll_sum, correct = jnp.sum(sums, axis=0)
    if not with_grads:
        return (loss_sum, nll_sum, correct), None, None
    # The barrier keeps XLA from folding the .T into a one-chunk loop's product (a bf16 dot that
    # XLA:CPU's dot thunk cannot run; see matmul.weight_grad).
    d_embedding = jax.lax.optimization_barrier(d_embedding).T
    return (loss_sum, nll_sum, correct), d_features.reshape(-1, d)[:n], d_embedding.astype(embedding.dtype)
