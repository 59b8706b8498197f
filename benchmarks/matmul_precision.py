"""Decoding-shaped matmuls on XLA:CPU in float32, bf16 inputs (float32 sums) and int8 weights.

    python benchmarks/matmul_precision.py            # d 128 and Transformer-base shapes

Each product x [rows, K] @ w [K, N] runs 64 times inside one jit (a fori_loop, as a decoding
step's matmuls run in the search's while loop), weights prepared outside the loop: float32,
bf16 (x rounded each iteration), int8 with per-output-channel scales (x quantised per row each
iteration, int32 sums, rescaled). Reports microseconds per product, median of 5 passes;
variants alternate so machine load hits them alike.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

REPEATS = 64


def variants(w):
    w16 = w.astype(jnp.bfloat16)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    w8 = jnp.round(w / scale).astype(jnp.int8)

    def f32(x):
        return x @ w

    def bf16(x):
        return jnp.matmul(x.astype(jnp.bfloat16), w16, preferred_element_type=jnp.float32)

    def int8(x):
        xs = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
        x8 = jnp.round(x / xs).astype(jnp.int8)
        acc = jax.lax.dot(x8, w8, preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * xs * scale

    return {"float32": f32, "bf16": bf16, "int8": int8}


def looped(f):
    @jax.jit
    def run(x):
        def body(i, x):
            y = f(x)
            return x + 1e-6 * y[:, : x.shape[1]].sum() if y.shape[1] >= x.shape[1] else x + 1e-6 * y.sum()
        return jax.lax.fori_loop(0, REPEATS, body, x)
    return run


def main():
    shapes = [("d128 qkv/out", 128, 128, 128), ("d128 ffn in", 128, 128, 256), ("d128 logits", 128, 128, 8000),
              ("base qkv/out", 128, 512, 512), ("base ffn in", 128, 512, 2048), ("base ffn out", 128, 2048, 512),
              ("base logits", 128, 512, 8000), ("base logits, 16 rows", 16, 512, 8000)]
    rng = np.random.default_rng(0)
    print(f"{jax.devices()}; rows x K x N: microseconds per product (float32 / bf16 / int8)")
    for name, rows, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))
        fns = {kind: looped(f) for kind, f in variants(w).items()}
        for fn in fns.values():
            fn(x).block_until_ready()
        times = {kind: [] for kind in fns}
        for _ in range(5):
            for kind, fn in fns.items():
                t0 = time.perf_counter()
                fn(x).block_until_ready()
                times[kind].append((time.perf_counter() - t0) / REPEATS * 1e6)
        med = {kind: statistics.median(t) for kind, t in times.items()}
        print(f"{name:22s} {rows:4d} x {k:4d} x {n:5d}: " + " / ".join(f"{med[k]:8.1f}" for k in fns)
              + f"   bf16 {med['float32'] / med['bf16']:.2f}x, int8 {med['float32'] / med['int8']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
