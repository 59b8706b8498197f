"""Matrix products with bfloat16 inputs and float32 accumulation, forward and backward.

Mixed-precision training for float32 models on CPUs that multiply bfloat16 natively
(AVX512-BF16, AMX): there a bf16 matmul runs ~1.8x as fast as a float32 one
(benchmarks/RESULTS.md), while parameters, activations, softmaxes, layer norms and the loss stay
float32. Inputs are rounded to bf16 (8 bits of mantissa), products are summed in float32: what
TPUs do to float32 matmuls by default. The backward pass is written out (custom VJP) so that its
two matmuls take bf16 inputs too; JAX's own transpose of a mixed-precision dot runs them in float32.

Which matmuls: the model's Linear layers (and, when decoding, the output projection) call
`dot_general` below, which reads the dtype set by `matmul_inputs` while a function is traced, as
`jax.default_matmul_precision` does. The training loss sets it (train_step.batch_sums); decoding
sets it from its `precision` setting (`decoding_inputs`): bf16 as in training, or int8 (weights
quantised per output channel, activations per row, int32 sums, as CTranslate2's int8 does:
int8_kernel.py, our own kernel where the CPU has AVX512-VNNI), or float32, exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re

import jax
import jax.numpy as jnp

from transformer_mt import int8_kernel
from transformer_mt.layer_norm import layer_norm as layer_norm_f32

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 dot instructions


@functools.cache
def cpu_has_bf16_dots() -> bool:
    """True on a Linux x86 CPU whose flags list a native bf16 dot product instruction (read once:
    the server resolves a request's precision on its event loop)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return False
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return bool(match) and any(flag in match.group(1).split() for flag in BF16_CPU_FLAGS)


def resolve_matmul_dtype(name: str, compute_dtype) -> jnp.dtype:
    """'auto': bfloat16 where the compute dtype is bf16 already, or on a CPU with native bf16
    dots; float32 otherwise (a bf16 matmul emulated in float32 is slower than a float32 one)."""
    if name != "auto":
        return jnp.dtype(name)
    if jnp.dtype(compute_dtype) == jnp.bfloat16:
        return jnp.dtype(jnp.bfloat16)
    if jax.default_backend() == "cpu" and cpu_has_bf16_dots():
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x, w, kernel_transposes: bool = False):
    """x [..., K] @ w [K, N] -> float32 [..., N], with both rounded to bf16. kernel_transposes:
    the weight's gradient by weight_grad's kernel route (see there)."""
    return _mm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x, w, kernel_transposes):
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # The residuals are the bf16 copies (half the memory of float32 inputs), and two scalars
    # that carry the inputs' dtypes, which the cotangents must have.
    return _mm(x16, w16), (x16, w16, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _bf16_matmul_bwd(kernel_transposes, residuals, g):
    x16, w16, x_like, w_like = residuals
    g16 = g.astype(jnp.bfloat16)
    dx = _mm(g16, w16.T).astype(x_like.dtype)
    dw = weight_grad(x16.reshape(-1, x16.shape[-1]), g16.reshape(-1, g16.shape[-1]), kernel_transposes)
    return dx, dw.astype(w_like.dtype)


def weight_grad(x, g, kernel_transposes: bool):
    """x^T @ g -> float32 [K, N] of bf16 x [T, K] and g [T, N]: a weight's gradient, summed over
    the T tokens. XLA:CPU runs a dot contracted over both operands' rows (x^T g) in float32, at
    half the rate of its bf16 dots here (150-185 against 345-380 GFLOP/s, 2,048 tokens,
    benchmarks/RESULTS.md). With kernel_transposes, where the kernel library runs, the smaller
    operand is first written out transposed by an opaque call (int8_kernel.transpose_bf16, ~0.5 ms
    for 2,048 x 512), which XLA cannot fold back into the dot, and the product is a bf16 dot. Only
    on one device: XLA's partitioner would gather a sharded operand of the opaque call."""
    if not (kernel_transposes and int8_kernel.available()):
        return _mm(x.T, g)
    if x.shape[1] <= g.shape[1]:
        return _mm(int8_kernel.transpose_bf16(x), g)
    # The barrier keeps XLA from folding the .T into the dot as x^T g again (which its bf16 dot
    # thunk then cannot run).
    return jax.lax.optimization_barrier(_mm(int8_kernel.transpose_bf16(g), x)).T


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


PRECISIONS = {"float32": None, "bf16": jnp.bfloat16, "int8": jnp.int8}  # decoding's names -> matmul_inputs dtype


def decoding_inputs(precision: str):
    """matmul_inputs for a decoding precision name ('float32', 'bf16' or 'int8')."""
    return matmul_inputs(PRECISIONS[precision])


INT8_FROM_WIDTH = 512  # without our int8 kernel, auto decodes models at least this wide with XLA's int8 products


def resolve_precision(name: str, d_model: int) -> str:
    """A decoding precision. 'auto': int8 where our int8 kernel runs (int8_kernel.py: a CPU with
    AVX512-VNNI and a C++ compiler), at every width: on the AMD EPYC of benchmarks/RESULTS.md it
    decodes 1.10-1.16x as fast as bf16 at d 128 and 2.5x at Transformer-base size, within 0.2
    BLEU of float32. Without it, on a CPU with native bf16 dots (AVX512-BF16/AMX): XLA's int8
    for models of d_model >= INT8_FROM_WIDTH (1.36-1.39x bf16's speed at base with AMX,
    1.04-1.15x without), bf16 below (XLA's int8 is 0.78-0.93x of bf16 at d 128); float32
    elsewhere (a GPU or TPU model computes in bf16 already)."""
    if name != "auto":
        return name
    if jax.default_backend() == "cpu" and int8_kernel.available():
        return "int8"
    if not (jax.default_backend() == "cpu" and cpu_has_bf16_dots()):
        return "float32"
    return "int8" if d_model >= INT8_FROM_WIDTH else "bf16"


def reduced_inputs() -> bool:
    """True while tracing under matmul_inputs(bf16 or int8)."""
    return _INPUT_DTYPE.get() in (jnp.bfloat16, jnp.int8)


_INPUT_DTYPE: contextvars.ContextVar = contextvars.ContextVar("matmul_input_dtype", default=None)
_KERNEL_TRANSPOSES: contextvars.ContextVar = contextvars.ContextVar("kernel_transposes", default=False)


@contextlib.contextmanager
def matmul_inputs(dtype, kernel_transposes: bool = False):
    """While tracing inside this block, float32 `dot_general`s of the model take `dtype` inputs
    (bfloat16: mixed precision; int8: quantised, for decoding only; None or float32: unchanged).
    kernel_transposes: bf16 weight gradients by weight_grad's kernel route (training on one device)."""
    token = _INPUT_DTYPE.set(None if dtype is None else jnp.dtype(dtype))
    kernel_token = _KERNEL_TRANSPOSES.set(kernel_transposes)
    try:
        yield
    finally:
        _INPUT_DTYPE.reset(token)
        _KERNEL_TRANSPOSES.reset(kernel_token)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """jax.lax.dot_general, except inside matmul_inputs(bfloat16 or int8), where a float32
    [..., K] x [K, N] product (a Linear layer's), or [..., K] x [N, K] contracted on K (the tied
    output projection), goes through bf16_matmul or int8_kernel.int8_matmul."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    linear = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) in ((0,), (1,)) and rhs.ndim == 2
              and not lhs_batch and not rhs_batch)
    inputs = _INPUT_DTYPE.get()
    if inputs in (jnp.bfloat16, jnp.int8) and linear and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32:
        transposed = tuple(rhs_contract) == (1,)  # x @ rhs.T: a tied output projection's [V, D] table
        if inputs == jnp.bfloat16:
            product = bf16_matmul(lhs, rhs.T if transposed else rhs, _KERNEL_TRANSPOSES.get())
        else:
            product = int8_kernel.int8_matmul(lhs, rhs, transposed)
        return product.astype(preferred_element_type or jnp.float32)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def int8_argmax(lhs, rhs, transposed: bool, banned_ids=()):
    """decode.first_argmax(dot_general(lhs, rhs) [..., N], banned_ids) in one pass by the int8
    kernel (int8_kernel.int8_matmul_argmax) where dot_general would run that product there; else
    None. rhs [K, N], or [N, K] when transposed."""
    if _INPUT_DTYPE.get() != jnp.int8 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None
    return int8_kernel.int8_matmul_argmax(lhs, rhs, transposed, banned_ids)


def _in_kernel_library(x) -> bool:
    """True for float32 x traced inside decoding_inputs(int8) where the int8 kernel runs: its
    library then takes the program's layer norms and softmaxes too."""
    return _INPUT_DTYPE.get() == jnp.int8 and x.dtype == jnp.float32 and int8_kernel.active()


def softmax_last(x):
    """jax.nn.softmax over the last axis; inside decoding_inputs(int8) where the int8 kernel runs,
    by its library (int8_kernel.softmax: a row's weights independent of its batch)."""
    if _in_kernel_library(x):
        return int8_kernel.softmax(x)
    return jax.nn.softmax(x, axis=-1)


def layer_norm(norm, x):
    """norm(x) for an nnx.LayerNorm; inside decoding_inputs(int8) where the int8 kernel runs, by
    its library's layer norm (int8_kernel.layer_norm: one call for XLA's two reductions); in
    float32 otherwise by layer_norm.layer_norm (the same values, a backward pass that keeps less)."""
    if norm.scale is not None and norm.bias is not None and _in_kernel_library(x):
        return int8_kernel.layer_norm(x, norm.scale[...], norm.bias[...], norm.epsilon)
    if (x.dtype == jnp.float32 and norm.scale is not None and norm.bias is not None
            and norm.dtype in (None, jnp.float32) and norm.scale.dtype == jnp.float32):
        return layer_norm_f32(x, norm.scale[...], norm.bias[...], norm.epsilon)
    return norm(x)
