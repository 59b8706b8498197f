"""Tools on run directories: checkpoint averaging and fine-tuning (--init-from), on the shared
trained run (see conftest.trained_run)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST, TINY, cli_here, tiny_config
from transformer_mt import corpus
from transformer_mt import data as data_lib
from transformer_mt import rundir
from transformer_mt import train_step as ts
from transformer_mt.average import select_best, select_last
from transformer_mt.checkpoint import Checkpoints
from transformer_mt.trainer import train


def one_error_line(result, *fragments):
    err = result.stderr.decode().strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_average_of_identical_checkpoints_is_bit_exact_and_translates(copied_run, trained_run, tmp_path):
    ckpts = copied_run / "checkpoints"
    for step in (401, 402):  # three identical checkpoints: a mean of x, x, x must give x back
        shutil.copytree(ckpts / "400", ckpts / str(step))
    out = tmp_path / "averaged"
    r = cli_here("average", "--checkpoint", str(copied_run), "--last", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    original = Checkpoints(trained_run / "checkpoints").read_state(400)
    averaged = Checkpoints(out / "checkpoints").read_state(402)
    leaves_a, leaves_b = jax.tree.leaves(original), jax.tree.leaves(averaged)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert json.loads((out / rundir.AVERAGED_FILE).read_text())["steps"] == [400, 401, 402]
    assert (out / "config.yaml").read_bytes() == (trained_run / "config.yaml").read_bytes()

    # translate and evaluate take the averaged run as --checkpoint, with the original's output
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("A man is riding a bike .\nTwo dogs play .\n")
    ref.write_text("Ein Mann fährt Fahrrad .\nZwei Hunde spielen .\n")
    mine = cli_here("translate", "--checkpoint", str(out), "-i", str(src), "--beam", "1")
    theirs = cli_here("translate", "--checkpoint", str(trained_run), "--step", "400", "-i", str(src), "--beam", "1")
    assert mine.returncode == 0 and mine.stdout == theirs.stdout and mine.stdout.count(b"\n") == 2
    r = cli_here("evaluate", "--checkpoint", str(out), "--src", str(src), "--ref", str(ref), "--beam", "1")
    assert r.returncode == 0 and b"BLEU = " in r.stdout, r.stderr.decode()

    r = cli_here("average", "--checkpoint", str(copied_run), "--last", "3", "-o", str(out))
    one_error_line(r, "already holds checkpoints")


def test_average_refuses_checkpoints_of_different_models(copied_run, trained_run):
    cfg = rundir.load_config(trained_run)
    tok = rundir.load_tokenizer(trained_run)
    other = tiny_config("model.ffn_dim=48")  # one array shape differs
    model = rundir.build_model(other, tok.src_vocab_size, tok.tgt_vocab_size)
    _, state = ts.init_state(model, ts.make_optimizer(cfg.train), 0)
    ckpts = Checkpoints(copied_run / "checkpoints")
    ckpts.save(401, state, {"step": 401})
    ckpts.close()
    r = cli_here("average", "--checkpoint", str(copied_run), "--last", "2")
    err = one_error_line(r, "cannot average checkpoints of different models", "ffn", "(48,)", "(64,)")
    assert err.index("checkpoints/401") < err.index("checkpoints/400")  # each shape with its checkpoint
    assert not (copied_run.parent / "run-avg-last2").exists()
    r = cli_here("average", "--checkpoint", str(copied_run), "--last", "5")
    one_error_line(r, "--last 5", "holds 2 checkpoint(s)", "train.keep_checkpoints")
    r = cli_here("average", "--checkpoint", str(copied_run), "--best", "2")  # 401's record has no BLEU history
    one_error_line(r, "--best 2", "validation BLEU")


def test_average_best_takes_the_highest_validation_bleu(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best_step = max((r for r in records if "bleu" in r), key=lambda r: r["bleu"])["step"]
    assert [step for _, step in select_best(trained_run, 1)] == [best_step]
    assert [step for _, step in select_last(trained_run, None)] == [400]


def test_init_from_starts_at_the_source_parameters(trained_run, tmp_path):
    """The fine-tuning run's first logged loss is the source checkpoint's loss on that first batch
    (same dropout key): its parameters arrived exactly. Optimizer and step start afresh."""
    cfg = tiny_config("train.max_steps=1", "train.log_every=1")
    run = tmp_path / "finetune"
    train(cfg, run, init_from=str(trained_run / "checkpoints" / "400"), progress_bar=False)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert (run / "spm.model").read_bytes() == (trained_run / "spm.model").read_bytes()

    _, graphdef, params, tok, step, _ = rundir.load_run(trained_run, 400)
    examples = data_lib.tokenize_pairs(tok, *corpus.load_split(cfg.data, "train"), cfg.data.max_len)
    batch = next(data_lib.TrainStream(examples, cfg.data, cfg.train.seed))
    state = {"params": params, "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(cfg.train.seed))}
    grads = jax.jit(ts.bind(ts.micro_grads, graphdef=graphdef, smoothing=cfg.train.label_smoothing))
    _, sums = grads(state, batch, jnp.int32(0))
    expected = float(sums["loss_sum"] / sums["tokens"])
    assert first["loss"] == pytest.approx(expected, rel=1e-5), (
        f"first fine-tuning loss {first['loss']:.5f} is not the source's {expected:.5f} on the same batch: "
        "the parameters of --init-from did not arrive intact")
    meta = Checkpoints(run / "checkpoints").read_meta(1)
    assert meta["progress"]["history"] == [] and meta["data_position"]["index"] == 1


def test_init_from_a_model_of_other_shapes_is_one_line(trained_run, tmp_path):
    sets = [x for o in FAST + ["model.ffn_dim=48"] for x in ("--set", o)]
    r = cli_here("train", "--config", str(TINY), "--workdir", str(tmp_path / "ft"), "--init-from", str(trained_run),
                 "--no-progress", *sets)
    one_error_line(r, "--init-from", "does not fit this model", "ffn", "(64,) in the checkpoint, (48,) in this model")
    r = cli_here("train", "--config", str(TINY), "--workdir", str(tmp_path / "ft2"), "--init-from",
                 str(tmp_path / "nowhere"), *sets)
    one_error_line(r, "nowhere", "neither a run directory")
