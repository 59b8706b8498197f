"""Training: a tiny model overfits, checkpoints round-trip bit for bit, resume is exact,
gradient accumulation equals one big batch, metrics and artifacts are written."""

import json
from types import SimpleNamespace

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


def copy_task_batch(n=8, length=10, vocab=24, seed=0, rows=None):
    """n random sentence pairs whose target is the reversed source (ids >= 4), padded to `rows`."""
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(n):
        ids = rng.integers(4, vocab, size=rng.integers(4, length - 1)).astype(np.int32)
        src.append(np.append(ids, 3).astype(np.int32))
        tgt.append(ids[::-1].copy())
    return pad_batch(Examples(src, tgt), np.arange(n), rows or n, length)


def make_copy_task(*overrides: str) -> SimpleNamespace:
    cfg = tiny_config("model.dropout=0.0", "train.label_smoothing=0.0", "train.learning_rate=3e-3",
                      "train.warmup_steps=20", "model.d_model=64", "model.ffn_dim=128", *overrides)
    model = Transformer(cfg.model, 24, 24, nnx.Rngs(params=0))
    tx = ts.make_optimizer(cfg.train)
    graphdef, state = ts.init_state(model, tx, 0)
    grads = jax.jit(ts.bind(ts.micro_grads, graphdef=graphdef, smoothing=0.0))
    apply = jax.jit(ts.bind(ts.apply_grads, tx=tx))
    return SimpleNamespace(init=state, grads=grads, apply=apply, tx=tx)


@pytest.fixture(scope="module")
def copy_task():
    """One model, optimizer and pair of compiled steps (gradients; update) for the tests below.

    Every batch they see is [8, 10], so each program is compiled once for the module.
    """
    return make_copy_task()


def fit_copy_task(task: SimpleNamespace, steps: int = 250):
    """`steps` optimizer steps on one batch of 8 pairs: (final state, last step's metrics)."""
    state, batch = task.init, copy_task_batch()
    for _ in range(steps):
        state, metrics = task.apply(state, *task.grads(state, batch, jnp.int32(0)))
    return state, metrics


@pytest.fixture(scope="module")
def overfitted(copy_task):
    return fit_copy_task(copy_task)


def assert_fits(metrics):
    assert float(metrics["loss"]) < 0.1, f"loss {float(metrics['loss']):.3f}: the model cannot fit 8 pairs"
    assert float(metrics["accuracy"]) == 1.0


def test_tiny_model_overfits_eight_pairs(overfitted):
    assert_fits(overfitted[1])


def test_tiny_model_overfits_with_bf16_matmuls():
    """Mixed precision (bf16 matmul inputs, float32 everything else) still fits the batch."""
    assert_fits(fit_copy_task(make_copy_task("model.matmul_dtype=bfloat16"))[1])


def test_gradient_accumulation_equals_one_big_batch(copy_task):
    """Summed micro-batch gradients, divided by all their target tokens, equal the big batch's.

    The halves are padded to 8 rows with empty pairs, which must add nothing.
    (Compared before Adam: its first step is ~lr * sign(g), which amplifies rounding in tiny g.)
    """
    state = copy_task.init
    big = copy_task_batch(n=8)
    first = copy_task_batch(n=4, rows=8)  # the first 4 pairs of `big` (same seed), 4 empty rows
    second = {k: np.roll(v, -4, axis=0) for k, v in copy_task_batch(n=8).items()}
    second = {k: np.where(np.arange(8)[:, None] < 4, v, 0) for k, v in second.items()}  # pairs 5..8
    g_big, m_big = copy_task.grads(state, big, jnp.int32(0))
    acc = None
    for i, half in enumerate((first, second)):
        out = copy_task.grads(state, half, jnp.int32(i))
        acc = out if acc is None else ts.accumulate(acc, *out)
    g_acc, m_acc = acc
    assert float(m_acc["tokens"]) == float(m_big["tokens"]) > 0
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, out_big = copy_task.apply(state, g_big, m_big)
    _, out_acc = copy_task.apply(state, g_acc, m_acc)
    np.testing.assert_allclose(float(out_acc["loss"]), float(out_big["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(out_acc["grad_norm"]), float(out_big["grad_norm"]), rtol=1e-5)


def test_nonfinite_step_is_skipped(copy_task):
    state = copy_task.init
    grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state["params"])
    metrics = {"loss_sum": jnp.float32(1.0), "nll_sum": jnp.float32(1.0), "tokens": jnp.float32(4.0),
               "correct": jnp.float32(0.0)}
    new, out = copy_task.apply(state, grads, metrics)
    assert not bool(out["finite"])
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(new["step"]) == 1


def test_checkpoint_round_trip_is_bit_exact(overfitted, tmp_path):
    state, _ = overfitted  # non-trivial optimizer moments
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
    # Translation's partial restore reads the same parameters, and nothing else.
    params = Checkpoints(tmp_path / "ckpt").restore_params(1, target["params"])
    assert jax.tree.structure(params) == jax.tree.structure(state["params"])
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout", [(), ("data.pack_lengths=[16]",)], ids=["buckets", "packed"])
def test_resume_continues_exactly(tmp_path, layout):
    """2N steps in one go == N steps, stop, --resume, N more (params bit for bit on CPU), with
    bucketed and with packed batches (training and validation)."""
    overrides = ("train.log_every=3", "train.checkpoint_every=0", "train.eval_every=3", *layout)
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
    train(tiny_config("train.max_steps=60", "train.log_every=10", "train.eval_every=30"), tmp_path,
          progress_bar=False)
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
