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
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    smooth = -jnp.mean(logp, axis=-1)  # [B, T]
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(nll * weights)


def correct_tokens(logits, targets, weights):
    """Number of weighted positions whose argmax equals the target."""
    return jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights.astype(jnp.float32))
