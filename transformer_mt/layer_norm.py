"""LayerNorm as flax computes it, with a backward pass that keeps one activation instead of three.

Autodiff through nnx.LayerNorm keeps x * x, x - mean and (x - mean) * scale of every norm for the
backward pass: three float32 copies of each [tokens, d_model] activation, 26% of a Transformer-base
training step's saved activations (benchmarks/RESULTS.md, tenth sitting). Here the forward pass is
flax's own formula, so outputs are bit-identical to nnx.LayerNorm, and the backward pass is the
closed form of the layer norm's gradient from the normalised input and the rows' 1/std alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _stats(x, epsilon):
    """(x - mean, 1 / sqrt(var + epsilon)) by flax's fast variance: mean(x^2) - mean(x)^2, floored at 0."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    mean_sq = jnp.mean(jax.lax.square(x), axis=-1, keepdims=True)
    var = jnp.maximum(0.0, mean_sq - jax.lax.square(mean))
    return x - mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon):
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis; x, scale, bias float32."""
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    """The output as flax computes it, and what the backward pass keeps."""
    centred, inv_std = _stats(x, epsilon)
    return centred * (inv_std * scale) + bias, (centred * inv_std, inv_std, scale)


def _backward(epsilon, residuals, dy):
    normed, inv_std, scale = residuals
    lead = tuple(range(dy.ndim - 1))
    d_scale = jnp.sum(dy * normed, axis=lead)
    d_bias = jnp.sum(dy, axis=lead)
    g = dy * scale
    # d/dx of (x - mean) * inv_std: g minus its mean and minus its projection on the normalised row.
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    return dx, d_scale, d_bias


layer_norm.defvjp(_forward, _backward)
