"""The int8 product kernel (int8_kernel.py, int8_matmul.cc): equal to XLA's int8 product bit for
bit on the same inputs, its weights packed once per params in a search, and a fallback to XLA
where it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import all_eqns
from transformer_mt import int8_kernel, search
from transformer_mt.config import ModelConfig
from transformer_mt.model import NEG_INF, Transformer

needs_kernel = pytest.mark.skipif(not int8_kernel.available(),
                                  reason="no C++ compiler or no AVX512-VNNI here: int8 products run in XLA")


@needs_kernel
@pytest.mark.parametrize("rows, k, n", [(1, 4, 1), (5, 32, 24), (7, 128, 100), (64, 128, 8000), (13, 132, 64),
                                        (6, 2048, 65)])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_equals_xla_int8_bit_for_bit(rows, k, n, transposed):
    """Rows not a multiple of the micro-kernel's 6, columns not of its 64, an all-zero row, a row
    of one large value, weights of unlike column sizes: the same floats as XLA's product."""
    rng = np.random.default_rng(rows * k + n)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[0] = 0.0
    if rows > 2:
        x[2, 1] = 1e4
    w = (rng.normal(size=(k, n)) * np.linspace(0.01, 10, n)).astype(np.float32)
    w_arg = w.T.copy() if transposed else w
    kernel = jax.jit(lambda x, w: int8_kernel.int8_matmul(x, w, transposed))(x, w_arg)
    with int8_kernel.disabled():
        xla = jax.jit(lambda x, w: int8_kernel.int8_matmul(x, w, transposed))(x, w_arg)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(xla))
    np.testing.assert_array_equal(np.asarray(kernel)[0], 0.0)


@needs_kernel
@pytest.mark.parametrize("rows, k, n", [(1, 4, 1), (7, 128, 100), (64, 128, 8000), (13, 132, 64), (3, 512, 8001)])
@pytest.mark.parametrize("banned", [(), (0, 1), "every third"])
def test_fused_argmax_picks_what_first_argmax_picks_from_the_product(rows, k, n, banned):
    """Greedy search's fused output projection: the first column of each row's largest allowed
    value of the kernel's product, ties included (repeated weight columns), banned columns in any
    block, columns not a multiple of 64, a row of zeros (all values tie: the first allowed)."""
    from transformer_mt.decode import first_argmax

    banned = tuple(range(0, n, 3)) if banned == "every third" else banned
    rng = np.random.default_rng(rows + k + n)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[0] = 0.0
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[:, n // 2:] = w[:, : n - n // 2]  # each value of the first half again in the second
    packed = int8_kernel.pack(jnp.asarray(w))
    fused = jax.jit(lambda x: int8_kernel.packed_argmax(x, packed, n, banned))(x)
    product = jax.jit(lambda x: int8_kernel.packed_matmul(x, packed, n))(x)
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(first_argmax(product, banned)))
    assert fused.dtype == jnp.int32 and fused.shape == (rows,)


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 128), (3, 5, 512), (7, 20)])
def test_layer_norm_is_flax_layer_norm_and_row_by_row(shape):
    """The kernel library's layer norm against flax's (the same formula; sums in another order, so
    within a few float32 steps), and each row's output the same whatever rows share its call."""
    rng = np.random.default_rng(shape[-1])
    norm = nnx.LayerNorm(shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 2.5  # a constant row: variance 0, the output is the bias
    x.reshape(-1, shape[-1])[-1] *= 1e-3  # variance ~1e-5: epsilon weighs as much as the variance
    ours = jax.jit(lambda x: int8_kernel.layer_norm(x, norm.scale[...], norm.bias[...], norm.epsilon))
    got = np.asarray(ours(x))
    np.testing.assert_allclose(got, np.asarray(jax.jit(norm)(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.reshape(-1, shape[-1])[0], np.asarray(norm.bias[...]))
    rows = x.reshape(-1, shape[-1])
    np.testing.assert_array_equal(np.asarray(ours(rows[1:3])), got.reshape(-1, shape[-1])[1:3])


@needs_kernel
@pytest.mark.parametrize("shape", [(6, 1), (4, 3, 16), (5, 37), (2, 130)])
def test_softmax_is_jax_softmax_and_row_by_row(shape):
    """The kernel library's softmax against jax.nn.softmax (its own exponential: within a few float32
    steps), masked logits (model.NEG_INF) weighing exactly 0, a fully masked row uniform as in XLA,
    and each row's output the same whatever rows share its call."""
    rng = np.random.default_rng(shape[-1])
    x = (rng.normal(size=shape) * 6).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows[0] = NEG_INF  # a fully masked row (an all-pad batch row)
    rows[1, ::2] = NEG_INF  # masked keys
    got = np.asarray(jax.jit(int8_kernel.softmax)(x))
    np.testing.assert_allclose(got, np.asarray(jax.nn.softmax(x, axis=-1)), rtol=2e-6, atol=1e-7)
    flat = got.reshape(-1, shape[-1])
    np.testing.assert_array_equal(flat[0], np.full(shape[-1], 1.0 / shape[-1], np.float32))
    if shape[-1] > 1:
        assert np.all(flat[1, ::2] == 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(int8_kernel.softmax)(rows[1:3])), flat[1:3])


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (64, 33), (70, 130)])
def test_transpose_bf16_moves_every_value_exactly(shape):
    """Shapes off the kernel's 32 x 32 tiles; signed zeros, infinities and a NaN's bits kept."""
    bits = np.random.default_rng(shape[1]).integers(0, 2**16, size=shape, dtype=np.uint16)
    bits.flat[0], bits.flat[-1] = 0x8000, 0x7FC1  # -0.0, a NaN with a payload
    x = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
    got = jax.jit(int8_kernel.transpose_bf16)(x)
    assert got.shape == shape[::-1] and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint16)), bits.T)


@needs_kernel
def test_kernel_takes_leading_dimensions():
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    out = jax.jit(int8_kernel.int8_matmul)(x, w)
    assert out.shape == (2, 3, 8)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(int8_kernel.reference)(x, w)))


@needs_kernel
@pytest.mark.parametrize("tie", [True, False])
def test_search_reads_weights_packed_once(tie):
    """In an int8 search every Linear product and the output projection (tied or not) go to the
    kernel with weights prepared outside the search program (none packed where it is used): the
    search's own trace holds no quantisation of weights, only the kernel's calls."""
    cfg = ModelConfig(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64,
                      dropout=0.0, dtype="float32", matmul_dtype="float32", tie_embeddings=tie)
    graphdef, params = nnx.split(Transformer(cfg, 40, 40, nnx.Rngs(0)), nnx.Param)
    program = search.compiled_search(graphdef, 1, 0.6, 1, 9, None, "int8")
    prepared = program.prepared(params)
    assert len(prepared) == 6 + 2 + 8 + 1  # encoder 6, cross keys/values 2, decoder 8, output 1
    other = search.compiled_search(graphdef, 2, 0.6, 1, 12, None, "int8")  # another program of the model
    assert other.prepared(params) is prepared  # packed once for all of them, not once a program
    args = (jnp.ones((2, 8), jnp.int32), jnp.full((2,), 9, jnp.int32), jnp.zeros((2, 0), jnp.int32),
            jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32), np.uint32(0))
    before = int8_kernel.packed_in_place
    eqns = list(all_eqns(jax.make_jaxpr(program.jitted)(params, prepared, *args).jaxpr))
    assert int8_kernel.packed_in_place == before
    assert "round" not in [e.primitive.name for e in eqns]
    targets = [e.params.get("target_name") for e in eqns if e.primitive.name == "ffi_call"]
    # 17 products; 7 layer norms: the encoder's two sub-layers and final norm, the decoder's three and final;
    # 3 softmaxes: the encoder's self-attention, the decoder's self- and cross-attention.
    assert (targets.count(int8_kernel.TARGET), targets.count(int8_kernel.LAYER_NORM_TARGET),
            targets.count(int8_kernel.SOFTMAX_TARGET)) == (17, 7, 3)
    # Greedy without scores: the output projection picks each row's token itself.
    argmax = search.compiled_search(graphdef, 1, 0.6, 1, 9, None, "int8", scores=False)
    targets = [e.params.get("target_name") for e in all_eqns(jax.make_jaxpr(argmax.jitted)(params, prepared, *args).jaxpr)
               if e.primitive.name == "ffi_call"]
    assert targets.count(int8_kernel.ARGMAX_TARGET) == 1 and targets.count(int8_kernel.TARGET) == 16


@needs_kernel
def test_prepared_weights_program_is_read_back_from_the_store(loaded_run, tmp_path, monkeypatch):
    """The weights' packing program is stored like the searches: a new process (a new preparer)
    reads it back instead of tracing it, and it packs the same bytes."""
    from transformer_mt import program_store, sharding

    monkeypatch.setattr(program_store, "store_dir", lambda kind="programs": tmp_path / kind)
    compiled = []
    real = program_store.compile_fresh
    monkeypatch.setattr(program_store, "compile_fresh", lambda lowered: compiled.append(1) or real(lowered))
    _, graphdef, params, _, mesh = loaded_run
    first = int8_kernel.preparer.__wrapped__(graphdef, sharding.replicated(mesh))(params)
    assert compiled == [1]
    again = int8_kernel.preparer.__wrapped__(graphdef, sharding.replicated(mesh))(params)
    assert compiled == [1], "the second preparer compiled its program again"
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))


@needs_kernel
@pytest.mark.parametrize("beam", [1, 2])
def test_kernel_search_agrees_with_xla_int8(loaded_run, beam):
    """The trained test run's translations through the kernel and through XLA's int8 product: XLA
    computes a product's inputs in other fusions in the two programs (a layer norm's last bits),
    so a score may move in its last digits and a near-tie between two words may go the other way;
    the rest is the same."""
    cfg, graphdef, params, tok, mesh = loaded_run
    translator = search.Translator(cfg, graphdef, tok, mesh)
    lines = ["A man is riding a bike .", "Two dogs play in the snow .", "A woman is walking down the street .",
             "A group of people stand in front of a building .", "A little girl is climbing .", "A dog runs ."]
    ids = tok.encode_src(lines)
    settings = search.settings_from(cfg, beam_size=beam, precision="int8")
    kernel = translator.translate_ids(params, ids, settings)
    with int8_kernel.disabled():
        xla = translator.translate_ids(params, ids, settings)
    same = [(a[0][1], b[0][1]) for a, b in zip(kernel, xla) if a[0][0] == b[0][0]]
    assert len(same) >= len(lines) - 1
    np.testing.assert_allclose(*zip(*same), rtol=1e-3)


def test_without_a_compiler_int8_runs_in_xla(monkeypatch, tmp_path, capsys):
    """A failed build is a warning and XLA's product, not an error; so is the switch to turn it off."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    int8_kernel.available.cache_clear()
    try:
        if int8_kernel._cpu_has_flags(int8_kernel.CPU_FLAGS) and jax.default_backend() == "cpu":
            assert not int8_kernel.available()
            assert "int8 products run in XLA" in capsys.readouterr().err
        x, w = np.ones((3, 8), np.float32), np.ones((8, 5), np.float32)
        np.testing.assert_array_equal(np.asarray(jax.jit(int8_kernel.int8_matmul)(x, w)), 8.0)
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("TRANSFORMER_MT_INT8_KERNEL", "0")
        int8_kernel.available.cache_clear()
        assert not int8_kernel.available()
    finally:
        monkeypatch.undo()
        int8_kernel.available.cache_clear()
        int8_kernel.available()  # registered again for the tests after this one
