"""int8 matrix products by our own AVX512-VNNI kernel (int8_matmul.cc), called from XLA.

XLA:CPU multiplies int8 no faster than bf16 (slower on AMD EPYC: benchmarks/RESULTS.md), while
the CPU's `vpdpbusd` sums four u8 x s8 products a lane in one instruction, twice bf16's rate.
The kernel takes float32 activations, quantises each row to u8 (offset 128: what `vpdpbusd`
multiplies), multiplies by weights quantised per output column and packed in the instruction's
layout (`pack`, plain XLA ops on the float32 weights, so XLA hoists them out of a search's loop),
and rescales. On the same inputs its products equal `reference` bit for bit: the same scales,
roundings and int32 sums.

The same library picks greedy search's tokens inside the output projection
(`int8_matmul_argmax`) and runs those programs' layer norms (`layer_norm`), which XLA:CPU spends
two small reductions on, and softmaxes (`softmax`); for training it writes out the transposed
operand of a weight gradient (`transpose_bf16`, matmul.weight_grad).

It is compiled on first use with the system's C++ compiler for this CPU (-march=native, ~3 s)
into ~/.cache/transformer_mt/kernels/ and registered with XLA. Without a compiler, on a CPU
without AVX512-VNNI, on another backend or with TRANSFORMER_MT_INT8_KERNEL=0, int8 products run
in XLA (`reference`), with the same quantisation, and layer norms and argmaxes in XLA too.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "transformer_mt_int8_matmul"
ARGMAX_TARGET = "transformer_mt_int8_matmul_argmax"
LAYER_NORM_TARGET = "transformer_mt_layer_norm"
SOFTMAX_TARGET = "transformer_mt_softmax"
TRANSPOSE_TARGET = "transformer_mt_transpose_bf16"
SOURCE = Path(__file__).with_name("int8_matmul.cc")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # what the kernel's instructions need
COLUMNS = 64  # output columns of a packed block (int8_matmul.cc: kCols)
INV_127 = 1.0 / 127.0


def scale(max_abs):
    """The step of a symmetric int8 grid reaching max_abs (1 where it is 0: all zeros stay 0),
    as max_abs * (1/127): the form XLA computes (it rewrites a division by a constant), which
    the kernel computes too."""
    return jnp.where(max_abs > 0, max_abs * jnp.float32(INV_127), jnp.float32(1.0))


def reference(x, w):
    """x [..., K] @ w [K, N] -> float32 [..., N] in XLA: w quantised per column and x per row
    (each one's largest magnitude maps to 127, rounded half to even), int32 sums, rescaled."""
    w_scale = scale(jnp.max(jnp.abs(w), axis=0))  # [N]
    x_scale = scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True))  # [..., 1]
    w8 = jnp.round(w * (1.0 / w_scale)).astype(jnp.int8)
    x8 = jnp.round(x * (1.0 / x_scale)).astype(jnp.int8)
    sums = jax.lax.dot_general(x8, w8, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return sums.astype(jnp.float32) * (x_scale * w_scale)


def pack(w):
    """w [K, N] float32 -> (int8 [N'/64 * K/4 * 4 * 16 * 4] in the kernel's layout, column
    scales [N'], 128 * column sums [N'] (what the u8 offset adds)), N' = N rounded up to 64.

    The layout change comes first, on the float32 weights, and the quantisation after it: XLA
    hoists elementwise work out of a while loop and drags the transpose along, where a transpose
    alone is left inside the loop (and becomes a copy of the weights at every step)."""
    k, n = w.shape
    padded = -(-n // COLUMNS) * COLUMNS
    w_scale = jnp.pad(scale(jnp.max(jnp.abs(w), axis=0)), (0, padded - n), constant_values=1.0)
    blocks = jnp.pad(w, ((0, 0), (0, padded - n))).reshape(k // 4, 4, padded // COLUMNS, 4, 16)
    blocks = blocks.transpose(2, 0, 3, 4, 1)  # [column block, k / 4, zmm, column, k % 4]
    q = jnp.round(blocks * (1.0 / w_scale).reshape(padded // COLUMNS, 1, 4, 16, 1)).astype(jnp.int8)
    offsets = 128 * jnp.sum(q.astype(jnp.int32), axis=(1, 4)).reshape(-1)
    return q.reshape(-1), w_scale, offsets


def packed_matmul(x, packed, n: int):
    """reference(x, w) by the kernel, from packed = pack(w) (w [K, N = n])."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), *packed)


def packed_argmax(x, packed, n: int, banned_ids=()):
    """decode.first_argmax(reference(x, w), banned_ids) by the kernel, from packed = pack(w) (w
    [K, N = n]): int32 [...], each row's first column of its largest allowed value, picked while
    the product is computed (the product itself is never written)."""
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
    banned = jnp.asarray(list(banned_ids) or [-1], jnp.int32)
    return jax.ffi.ffi_call(ARGMAX_TARGET, out)(x.astype(jnp.float32), *packed, banned, n=np.int64(n))


def int8_matmul(x, w, transposed: bool = False):
    """reference(x, w) (w.T where transposed): by the kernel while `active()` and K is a multiple
    of 4, from the weights `prepared` for the search being traced where they are there (else
    packed here), otherwise in XLA."""
    weight = w.T if transposed else w
    if not (active() and weight.shape[0] % 4 == 0):
        return reference(x, weight)
    return packed_matmul(x, _packed(w, transposed), weight.shape[1])


def int8_matmul_argmax(x, w, transposed: bool = False, banned_ids=()):
    """first_argmax(int8_matmul(x, w, transposed), banned_ids) by the kernel in one pass (greedy
    search's output projection: the [rows, vocabulary] logits are neither written nor read back),
    or None where int8_matmul would not run in the kernel."""
    weight = w.T if transposed else w
    if not (active() and weight.shape[0] % 4 == 0):
        return None
    return packed_argmax(x, _packed(w, transposed), weight.shape[1], banned_ids)


def layer_norm(x, scale, bias, epsilon: float):
    """flax's LayerNorm of x [..., D] (scale, bias [D]) in one call of the kernel library: in a
    decoding program whose int8 products run in the kernel, where XLA:CPU spends two reductions
    of ~50 us each on a [rows, 128] layer norm. The same formula in float32; the sums run in
    another order, so the last bits may differ from XLA's, but a row's result never depends on
    the other rows of its batch."""
    return jax.ffi.ffi_call(LAYER_NORM_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon=np.float32(epsilon))


def softmax(x):
    """jax.nn.softmax(x, axis=-1) of float32 x by the kernel library, each row on its own: the
    attention weights of a decoding program whose products run in the kernel. XLA:CPU's two
    reductions over a row may sum it in another order for another batch shape, which moved 1
    line in 1,000 of an int8 test_2016 with the batch's row count (benchmarks/RESULTS.md). The
    library's exponential is within ~1 ulp of XLA's, so last bits differ from jax.nn.softmax."""
    return jax.ffi.ffi_call(SOFTMAX_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(x.astype(jnp.float32))


def transpose_bf16(x):
    """x.T of a 2-D bfloat16 x, written out by the kernel library (training's weight gradients,
    matmul.weight_grad): an opaque call, which XLA cannot fold into the dot that reads it."""
    return jax.ffi.ffi_call(TRANSPOSE_TARGET, jax.ShapeDtypeStruct(x.shape[::-1], jnp.bfloat16))(
        x.astype(jnp.bfloat16))


def _packed(w, transposed: bool):
    """pack(w, or w.T) as `prepared` for the search being traced, else packed here."""
    packed = _PREPARED.get().get((id(w), transposed))
    if packed is None:
        global packed_in_place
        packed_in_place += 1
        packed = pack(w.T if transposed else w)
    return packed


# ---------------------------------------------------------------------------- weights packed once


def packable(model) -> list:
    """(weight, transposed) of the model's products that the kernel can run (K a multiple of 4)."""
    return [(w, t) for w, t in model.decoding_weights() if (w.shape[1] if t else w.shape[0]) % 4 == 0]


@functools.lru_cache(maxsize=16)
def preparer(graphdef, sharding=None):
    """params -> [pack(weight) for each of `packable(model)`]: a search's int8 weights, packed
    once per params object rather than in every call of the search (at Transformer-base size the
    packing cost as much as the products of a 100-sentence batch), and shared by every program of
    the model (a file meets several batch shapes, a server 30)."""
    from flax import nnx

    def prepare(params):
        return [pack(w.T if t else w) for w, t in packable(nnx.merge(graphdef, params))]

    return _Prepared(jax.jit(prepare, out_shardings=sharding), graphdef, sharding)


class _Prepared:
    """A jitted prepare(params) that keeps its result for the last params object it was given,
    its program kept in the program store (tracing it cost 0.25 s of each `translate` at d 128,
    0.46 s at base size) where the output sharding names the devices."""

    def __init__(self, prepare, graphdef=None, sharding=None):
        from transformer_mt import program_store

        self.prepare = prepare
        self._last: tuple | None = None  # (weak reference to params, prepared)
        self._lock = threading.Lock()  # a server's warm-up and its batches may ask at once
        mesh = getattr(sharding, "mesh", None)
        self.store = None if mesh is None else program_store.store_dir()
        if self.store is not None:
            self.devices = list(mesh.devices.flat)
            self.key_parts = ("int8_kernel.prepare", program_store.structure(graphdef), mesh.devices.tolist(),
                              mesh.axis_names, repr(sharding.spec))

    def _run(self, params):
        if self.store is None:
            return self.prepare(params)
        from transformer_mt import program_store

        signature = tuple((x.shape, x.dtype.name, x.sharding) for x in jax.tree.leaves(params))
        program = program_store.load_or_compile(self.store, program_store.program_key(self.key_parts, signature),
                                                self.devices, lambda: self.prepare.lower(params))
        return program(params)

    def __call__(self, params):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
            return self.prepare(params)  # traced (make_jaxpr): nothing to keep
        with self._lock:
            last = self._last
            if last is not None and last[0]() is params:
                return last[1]
            prepared = self._run(params)
            try:
                self._last = (weakref.ref(params), prepared)
            except TypeError:  # a container without weak references: prepared every time
                pass
            return prepared


def nothing_prepared(params) -> list:
    """What a program that does not run the kernel reads besides its params: nothing."""
    return []


def preparer_for(graphdef, precision: str, mesh=None) -> tuple:
    """(kernel, prepare) for a decoding program at `precision`: whether its int8 products go to
    the kernel (read while it is traced, part of its key), and params -> what it reads besides
    them (`preparer`, or `nothing_prepared`)."""
    from transformer_mt import sharding

    if not runs(precision):
        return False, nothing_prepared
    return True, preparer(graphdef, None if mesh is None else sharding.replicated(mesh))


def runs(precision: str) -> bool:
    """True when a decoding program at `precision` traced now has its int8 products in the kernel."""
    return precision == "int8" and active()


_PREPARED: contextvars.ContextVar = contextvars.ContextVar("int8_prepared_weights", default={})


@contextlib.contextmanager
def using(model, prepared):
    """While tracing inside this block, int8 products of the model's weights read `prepared`
    (preparer's output for the same params), found by the identity of the weights' tracers."""
    table = {(id(w), t): packed for (w, t), packed in zip(packable(model), prepared)} if prepared else {}
    token = _PREPARED.set(table)
    try:
        yield
    finally:
        _PREPARED.reset(token)


packed_in_place = 0  # products traced with weights packed where they are used (not prepared): tests


@contextlib.contextmanager
def decoding_model(graphdef, params, prepared, kernel: bool):
    """nnx.merge(graphdef, params), traced with its int8 products in the kernel from `prepared`
    (kernel) or in XLA: the body of every decoding program (search, the server's row pool)."""
    from flax import nnx

    with contextlib.ExitStack() as stack:
        if not kernel:
            stack.enter_context(disabled())
        model = nnx.merge(graphdef, params)
        stack.enter_context(using(model, prepared))
        yield model


_ENABLED: contextvars.ContextVar = contextvars.ContextVar("int8_kernel_enabled", default=True)


@contextlib.contextmanager
def disabled():
    """While tracing inside this block int8 products run in XLA (tests and benchmarks compare)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def active() -> bool:
    """True when int8 products traced now go to the kernel."""
    return _ENABLED.get() and available()


@functools.cache
def available() -> bool:
    """The kernel is built (or found built) and registered with XLA, on a CPU that runs it."""
    if os.environ.get("TRANSFORMER_MT_INT8_KERNEL", "1") == "0" or jax.default_backend() != "cpu":
        return False
    if not _cpu_has_flags(CPU_FLAGS):
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.TransformerMtInt8Matmul), platform="cpu")
        jax.ffi.register_ffi_target(ARGMAX_TARGET, jax.ffi.pycapsule(library.TransformerMtInt8MatmulArgmax),
                                    platform="cpu")
        jax.ffi.register_ffi_target(LAYER_NORM_TARGET, jax.ffi.pycapsule(library.TransformerMtLayerNorm),
                                    platform="cpu")
        jax.ffi.register_ffi_target(SOFTMAX_TARGET, jax.ffi.pycapsule(library.TransformerMtSoftmax), platform="cpu")
        jax.ffi.register_ffi_target(TRANSPOSE_TARGET, jax.ffi.pycapsule(library.TransformerMtTransposeBf16),
                                    platform="cpu")
    except Exception as e:  # noqa: BLE001 (no compiler, a failed build, a jaxlib without FFI: XLA runs them)
        print(f"warning: the int8 kernel is not available ({_first_line(e)}); int8 products run in XLA",
              file=sys.stderr)
        return False
    return True


def _cpu_has_flags(flags) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    present = set(line.partition(":")[2].split())
    return all(flag in present for flag in flags)


def build() -> Path:
    """The kernel's shared library, compiled once per source, jaxlib and CPU; OSError or
    SubprocessError when it cannot be."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler (g++, c++ or clang++) found")
    import jaxlib

    from transformer_mt.program_store import host_fingerprint

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + f"{jaxlib.__version__} {host_fingerprint()} {compiler}".encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = Path(base) / "transformer_mt" / "kernels"
    library = directory / f"int8_matmul-{key}.so"
    if library.is_file():
        return library
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir())
        library = directory / library.name
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{jax.ffi.include_dir()}", "-o", tmp, str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {_first_line(done.stderr)}")
        os.replace(tmp, library)  # whole or not at all: another process may be building it too
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
