"""Mixed-precision matmuls: bf16 inputs, float32 sums, in the forward and the backward pass,
and only where the training loss asks for them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import all_eqns
from transformer_mt import int8_kernel, matmul
from transformer_mt.config import ModelConfig
from transformer_mt.model import Transformer


def rounded(x):
    """x rounded to bf16 and back: what bf16_matmul multiplies."""
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def toy_batch(seed: int) -> dict:
    """A padded batch of 4 random pairs over a 40-token vocabulary (ids 4-39, EOS 3 on the sources)."""
    from transformer_mt.data import Examples, pad_batch

    rng = np.random.default_rng(seed)
    src = [np.append(rng.integers(4, 40, size=n), 3).astype(np.int32) for n in (5, 7, 3, 6)]
    tgt = [rng.integers(4, 40, size=n).astype(np.int32) for n in (4, 6, 5, 3)]
    return pad_batch(Examples(src, tgt), np.arange(4), 4, 8)


def test_bf16_matmul_rounds_inputs_and_sums_in_float32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    w = rng.normal(size=(48, 24)).astype(np.float32)
    g = rng.normal(size=(3, 5, 24)).astype(np.float32)
    out, pullback = jax.vjp(matmul.bf16_matmul, x, w)
    dx, dw = pullback(g)
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    # A product of two bf16 numbers is exact in float32, so only the order of the float32 sums
    # separates these from float64 products of the rounded inputs.
    np.testing.assert_allclose(out, rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rounded(g) @ rounded(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rounded(x).reshape(-1, 48).T @ rounded(g).reshape(-1, 24), rtol=1e-5, atol=1e-5)
    # ...and they are not the float32 products: the test would notice float32 inputs.
    assert np.abs(np.asarray(out) - x @ w).max() > 1e-3
    assert np.abs(np.asarray(dw) - x.reshape(-1, 48).T @ g.reshape(-1, 24)).max() > 1e-3


@pytest.mark.skipif(not int8_kernel.available(), reason="no kernel library here: weight gradients run in XLA")
@pytest.mark.parametrize("k, n", [(48, 24), (24, 48), (32, 32)])
def test_weight_grad_by_kernel_transposes_is_x_transposed_times_g(k, n):
    """Both of weight_grad's kernel routes (the smaller operand transposed: x, or g with the
    product transposed back) give x^T g of the bf16 inputs summed in float32, as XLA's does."""
    rng = np.random.default_rng(k * n)
    x = jnp.asarray(rng.normal(size=(70, k)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(70, n)), jnp.bfloat16)
    exact = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    for kernel in (False, True):
        got = jax.jit(matmul.weight_grad, static_argnums=2)(x, g, kernel)
        assert got.shape == (k, n) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not int8_kernel.available(), reason="no kernel library here: weight gradients run in XLA")
def test_training_gradients_take_every_weight_through_the_kernel_transposes():
    """The micro-step traced as the trainer traces it on one device: one kernel transpose per
    Linear layer's weight and one for the tied embedding's (in the loss's loop), gradients equal
    to the XLA route's but for the order of float32 sums; none without the flag."""
    from transformer_mt import train_step as ts

    batch = toy_batch(3)
    cfg = ModelConfig(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64,
                      dropout=0.0, dtype="float32", matmul_dtype="bfloat16", tie_embeddings=True)
    model = Transformer(cfg, 40, 40, nnx.Rngs(0))
    linears = sum(isinstance(m, nnx.Linear) for _, m in nnx.iter_modules(model))
    graphdef, params = nnx.split(model, nnx.Param)

    def gradients(kernel):
        fn = lambda p: ts.batch_sums(p, graphdef, batch, None, 0.1, kernel)  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(fn, has_aux=True))(params)
        calls = sum(e.params.get("target_name") == int8_kernel.TRANSPOSE_TARGET for e in all_eqns(jaxpr.jaxpr))
        return calls, jax.jit(jax.grad(fn, has_aux=True))(params)[0]

    (calls, by_kernel), (none, by_xla) = gradients(True), gradients(False)
    assert (calls, none) == (linears + 1, 0)
    for a, b in zip(jax.tree.leaves(by_kernel), jax.tree.leaves(by_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_linear_layers_use_bf16_only_inside_matmul_inputs():
    rng = np.random.default_rng(1)
    layer = nnx.Linear(16, 8, dot_general=matmul.dot_general, rngs=nnx.Rngs(0))
    x = rng.normal(size=(4, 16)).astype(np.float32)
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    np.testing.assert_allclose(layer(x), x @ kernel + bias, rtol=1e-6, atol=1e-6)  # outside: float32
    with matmul.matmul_inputs(jnp.float32):
        np.testing.assert_allclose(layer(x), x @ kernel + bias, rtol=1e-6, atol=1e-6)
    with matmul.matmul_inputs(jnp.bfloat16):
        inside = jax.jit(layer)(x)  # traced inside the block
    np.testing.assert_allclose(inside, rounded(x) @ rounded(kernel) + bias, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(inside) - (x @ kernel + bias)).max() > 1e-4


def test_bf16_training_loss_and_gradients_stay_close_to_float32():
    """The same model and batch: loss within 1%, gradients within a few percent of their norm;
    decoding (outside the training loss) is float32 either way."""
    from transformer_mt import train_step as ts

    batch = toy_batch(2)
    results = {}
    for name in ("float32", "bfloat16"):
        cfg = ModelConfig(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64,
                          dropout=0.0, dtype="float32", matmul_dtype=name, tie_embeddings=False)
        model = Transformer(cfg, 40, 40, nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        grads, metrics = jax.grad(lambda p: ts.batch_sums(p, graphdef, batch, None, 0.1), has_aux=True)(params)
        results[name] = (grads, metrics, model(batch["src"], batch["tgt_in"]))
    (g32, m32, logits32), (g16, m16, logits16) = results["float32"], results["bfloat16"]
    np.testing.assert_allclose(m16["loss_sum"], m32["loss_sum"], rtol=1e-2)
    assert float(m16["loss_sum"]) != float(m32["loss_sum"])  # bf16 did take part
    diff = [np.linalg.norm(np.asarray(a) - b) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))]
    norms = [np.linalg.norm(b) for b in jax.tree.leaves(g32)]
    total = np.linalg.norm(norms)
    assert np.linalg.norm(diff) < 0.03 * total
    # Leaf by leaf, except those whose true gradient is ~0 (the key biases: a softmax does not
    # see a shift shared by all its logits), where bf16 and float32 both give rounding noise.
    assert all(d < 0.1 * n for d, n in zip(diff, norms) if n > 1e-3 * total)
    np.testing.assert_array_equal(logits16, logits32)  # the forward pass outside training: float32


def test_auto_resolves_by_compute_dtype_and_cpu():
    assert matmul.resolve_matmul_dtype("float32", jnp.float32) == jnp.float32
    assert matmul.resolve_matmul_dtype("bfloat16", jnp.float32) == jnp.bfloat16
    assert matmul.resolve_matmul_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    native = jax.default_backend() == "cpu" and matmul.cpu_has_bf16_dots()
    assert matmul.resolve_matmul_dtype("auto", jnp.float32) == (jnp.bfloat16 if native else jnp.float32)
