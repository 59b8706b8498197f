"""Label-smoothed cross entropy and token accuracy as sums over real target tokens (pure jnp).

Sums, not means: the caller divides by the number of target tokens of the whole (possibly
accumulated, possibly sharded) batch, so the loss does not depend on how it was split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
