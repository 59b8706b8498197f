"""Decoding precision (decode.precision, --precision): float32 exact, bf16 and int8 matmul inputs
in the Linear layers and the output projection only, and the option reaching the search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import all_eqns, tiny_config
from transformer_mt import cli, int8_kernel, matmul
from transformer_mt import search
from transformer_mt.config import ConfigError, ModelConfig
from transformer_mt.model import Transformer


def test_int8_matmul_scales_per_channel_and_row():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero row stays zero (no 0 / 0)
    w = (rng.normal(size=(64, 24)) * np.linspace(0.01, 10, 24)).astype(np.float32)  # columns of unlike sizes
    out = np.asarray(jax.jit(int8_kernel.reference)(x, w))
    exact = x @ w
    assert out.dtype == np.float32 and not np.isnan(out).any()
    np.testing.assert_array_equal(out[0, 1], 0.0)
    # Each input is off by at most half a step of its grid; relative to each column's own scale
    # (a per-tensor scale would lose the small columns entirely).
    bound = 64 * (np.abs(x).max(-1, keepdims=True) * np.abs(w).max(0) / 127)
    assert (np.abs(out - exact) <= bound).all()
    assert np.abs(out - exact).max() > 1e-4  # not float32 products


def _dots(jaxpr):
    """(lhs dtype, rhs dtype) of every dot_general in a jaxpr and its sub-jaxprs (loops, branches)."""
    return [(str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype)) for e in all_eqns(jaxpr)
            if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("beam", [1, 2])
def test_precision_changes_only_the_linear_and_output_matmuls(beam):
    """A 1+1-layer model's search: 6 encoder Linear products, 2 cross key/value projections and,
    per step, 8 decoder Linear products and the tied output projection take bf16 (or int8) inputs;
    every attention product stays float32; float32 precision has no reduced-precision dot."""
    cfg = ModelConfig(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64,
                      dropout=0.0, dtype="float32", matmul_dtype="float32", tie_embeddings=True)
    graphdef, params = nnx.split(Transformer(cfg, 40, 40, nnx.Rngs(0)), nnx.Param)
    args = (params, jnp.ones((2, 8), jnp.int32), jnp.full((2,), 9, jnp.int32), jnp.zeros((2, 0), jnp.int32),
            jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32), np.uint32(0))
    with int8_kernel.disabled():  # int8 products as XLA dots (the kernel's calls: test_int8_kernel)
        dots = {p: _dots(jax.make_jaxpr(search.compiled_search(graphdef, beam, 0.6, 1, 9, None, p))(*args).jaxpr)
                for p in ("float32", "bf16", "int8")}
    assert set(dots["float32"]) == {("float32", "float32")}
    for precision, dtype in (("bf16", "bfloat16"), ("int8", "int8")):
        reduced = [d for d in dots[precision] if d != ("float32", "float32")]
        assert reduced == [(dtype, dtype)] * 17, precision
        assert len(dots[precision]) == len(dots["float32"])  # the same products, attention's in float32


def test_precision_option_reaches_the_search(loaded_run):
    """--precision parses into the settings, and each precision decodes with its own program:
    the scores differ from float32's (a test that fails when the option is ignored), while the
    translations mostly agree."""
    cfg, graphdef, params, tok, mesh = loaded_run
    args = cli.build_parser().parse_args(["translate", "--checkpoint", "run", "--precision", "int8", "--beam", "1"])
    assert search.settings_from_args(cfg, args).precision == "int8"
    assert search.settings_from(cfg).precision == "float32"  # the tests' config pins it
    assert search.settings_from(cfg, precision="auto").precision == matmul.resolve_precision("auto", cfg.model.d_model)
    with pytest.raises(ConfigError, match="--precision"):
        search.settings_from(cfg, precision="fp8")
    translator = search.Translator(cfg, graphdef, tok, mesh)
    ids = tok.encode_src(["A man is riding a bike .", "Two dogs play in the snow .", "A woman is walking ."])
    out = {p: translator.translate_ids(params, ids, search.settings_from(cfg, beam_size=2, precision=p))
           for p in ("float32", "bf16", "int8")}
    scores = {p: [h[0][1] for h in r] for p, r in out.items()}
    assert scores["bf16"] != scores["float32"] and scores["int8"] != scores["float32"]
    assert scores["int8"] != scores["bf16"]
    np.testing.assert_allclose(scores["bf16"], scores["float32"], rtol=0.05)
    again = translator.translate_ids(params, ids, search.settings_from(cfg, beam_size=2, precision="float32"))
    assert again == out["float32"]  # float32 is deterministic: the differences above are the precision's


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_auto_precision_follows_the_model_width(monkeypatch, native, kernel):
    """auto where our int8 kernel runs: int8 at every width. Without it, on a CPU with native bf16
    dots: bf16 below INT8_FROM_WIDTH (XLA's int8 is slower there), int8 from it up (Transformer
    base); float32 on a CPU without them, whatever the width."""
    monkeypatch.setattr(matmul, "cpu_has_bf16_dots", lambda: native)
    monkeypatch.setattr(int8_kernel, "available", lambda: kernel)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    widths = {128: "bf16", matmul.INT8_FROM_WIDTH - 1: "bf16", matmul.INT8_FROM_WIDTH: "int8", 1024: "int8"}
    want = dict.fromkeys(widths, "int8") if kernel else widths if native else dict.fromkeys(widths, "float32")
    assert {w: matmul.resolve_precision("auto", w) for w in widths} == want
    assert matmul.resolve_precision("float32", 1024) == "float32"


def test_auto_precision_and_config_key():
    native = jax.default_backend() == "cpu" and matmul.cpu_has_bf16_dots()
    assert matmul.resolve_precision("auto", 128) == (
        "int8" if int8_kernel.available() else "bf16" if native else "float32")
    assert matmul.resolve_precision("bf16", 1024) == "bf16"
    assert matmul.resolve_precision("int8", 128) == "int8"
    with pytest.raises(ConfigError, match="decode.precision"):
        tiny_config("decode.precision=fp16")
