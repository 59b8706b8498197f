"""Training: a tiny model overfits, checkpoints round-trip bit for bit, resume is exact,
gradient accumulation equals one big batch, metrics and artifacts are written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from transformer_mt import sharding
from transformer_mt import train_step as ts
from transformer_mt.checkpoint import Checkpoints
from transformer_mt.data import pad_batch, Examples
from transformer_mt.model import Transformer
from transformer_mt.trainer import train


def copy_task_batch(n=8, length=10, vocab=24, seed=0):
    """8 random sentence pairs whose target is the reversed source (ids >= 4)."""
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(n):
        ids = rng.integers(4, vocab, size=rng.integers(4, length - 1)).astype(np.int32)
        src.append(np.append(ids, 3).astype(np.int32))
        tgt.append(ids[::-1].copy())
    return pad_batch(Examples(src, tgt), np.arange(n), n, length)


def make_state(cfg, vocab=24):
    model = Transformer(cfg.model, vocab, vocab, nnx.Rngs(params=0))
    tx = ts.make_optimizer(cfg.train)
    graphdef, state = ts.init_state(model, tx, 0)
    return graphdef, tx, state


def test_tiny_model_overfits_eight_pairs():
    cfg = tiny_config("model.dropout=0.0", "train.label_smoothing=0.0", "train.learning_rate=3e-3",
                      "train.warmup_steps=20", "model.d_model=64", "model.ffn_dim=128")
    graphdef, tx, state = make_state(cfg)
    step = jax.jit(ts.bind(ts.train_step, graphdef=graphdef, tx=tx, smoothing=0.0), donate_argnums=0)
    batch = copy_task_batch()
    for _ in range(250):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1, f"loss {float(metrics['loss']):.3f}: the model cannot fit 8 pairs"
    assert float(metrics["accuracy"]) == 1.0


def test_gradient_accumulation_equals_one_big_batch():
    """Summed micro-batch gradients, divided by all their target tokens, equal the big batch's.

    (Compared before Adam: its first step is ~lr * sign(g), which amplifies rounding in tiny g.)
    """
    cfg = tiny_config("model.dropout=0.0")
    graphdef, tx, state = make_state(cfg)
    big = copy_task_batch(n=8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    g_big, m_big = ts.micro_grads(state, big, 0, graphdef=graphdef, smoothing=0.1)
    acc = None
    for i, half in enumerate(halves):
        out = ts.micro_grads(state, half, i, graphdef=graphdef, smoothing=0.1)
        acc = out if acc is None else ts.accumulate(acc, *out)
    g_acc, m_acc = acc
    assert float(m_acc["tokens"]) == float(m_big["tokens"]) > 0
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, out_big = ts.apply_grads(state, g_big, m_big, tx=tx)
    _, out_acc = ts.apply_grads(state, g_acc, m_acc, tx=tx)
    np.testing.assert_allclose(float(out_acc["loss"]), float(out_big["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(out_acc["grad_norm"]), float(out_big["grad_norm"]), rtol=1e-5)


def test_nonfinite_step_is_skipped():
    cfg = tiny_config()
    graphdef, tx, state = make_state(cfg)
    grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state["params"])
    metrics = {"loss_sum": jnp.float32(1.0), "nll_sum": jnp.float32(1.0), "tokens": jnp.float32(4.0),
               "correct": jnp.float32(0.0)}
    new, out = ts.apply_grads(state, grads, metrics, tx=tx)
    assert not bool(out["finite"])
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(new["step"]) == 1


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = tiny_config()
    graphdef, tx, state = make_state(cfg)
    step = jax.jit(ts.bind(ts.train_step, graphdef=graphdef, tx=tx, smoothing=0.1))
    state, _ = step(state, copy_task_batch())  # non-trivial optimizer moments
    ckpts = Checkpoints(tmp_path / "ckpt", keep=2)
    ckpts.save(1, state, {"data_position": {"epoch": 0, "index": 1}})
    ckpts.wait()
    target = jax.tree.map(jnp.zeros_like, state)
    restored, meta = Checkpoints(tmp_path / "ckpt").restore(None, target)
    assert meta["data_position"] == {"epoch": 0, "index": 1}
    flat_a, tree_a = jax.tree.flatten(state)
    flat_b, tree_b = jax.tree.flatten(restored)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_continues_exactly(tmp_path):
    """2N steps in one go == N steps, stop, --resume, N more (params bit for bit on CPU)."""
    overrides = ("train.log_every=3", "train.checkpoint_every=0", "train.eval_every=3")
    straight = tiny_config("train.max_steps=6", *overrides)
    train(straight, tmp_path / "straight", progress_bar=False)
    train(tiny_config("train.max_steps=3", *overrides), tmp_path / "split", progress_bar=False)
    train(tiny_config("train.max_steps=6", *overrides), tmp_path / "split", resume=True, progress_bar=False)

    def params(run):
        ckpts = Checkpoints(run / "checkpoints")
        assert ckpts.latest_step() == 6
        return ckpts.manager.restore(6)["state"]["params"]

    a, b = jax.tree.leaves(params(tmp_path / "straight")), jax.tree.leaves(params(tmp_path / "split"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    log = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight_log = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]


def test_train_writes_artifacts_and_loss_falls(tmp_path):
    train(tiny_config("train.max_steps=60", "train.log_every=10", "train.learning_rate=5e-3",
                      "train.eval_every=30"), tmp_path, progress_bar=False)
    for name in ("config.yaml", "spm.model", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "split" not in r]
    assert {"step", "loss", "lr", "tokens_per_sec"} <= set(train_recs[0])
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 1.0
    assert any(r.get("split") == "valid" for r in records)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(tiny_config(), tmp_path, progress_bar=False)


def test_mesh_shards_batches_over_data_axis():
    mesh = sharding.make_mesh()
    batch = sharding.put_batch(mesh, copy_task_batch())
    assert batch["src"].sharding.spec[0] == sharding.DATA
