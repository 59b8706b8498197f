"""The program store: a search program read back from disk translates exactly as the program
compiled in process; a changed setting, shape or code gets its own program; a damaged file is
compiled again; a model's structure is read back equal to the traced one."""

import os

import jax
import numpy as np
import pytest

from transformer_mt import program_store, rundir, search, sharding
from transformer_mt.tokenizer import PAD_ID

SENTENCES = ["A man rides a bike .", "Two dogs play in the snow .", "Kids play .", "A woman walks ."]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(program_store, "store_dir", lambda kind="programs": tmp_path / kind)
    return tmp_path / "programs"


@pytest.fixture
def compiles(monkeypatch):
    """How many programs were compiled (not read from the store) since the test began."""
    count = []
    real = program_store.compile_fresh

    def counted(lowered):
        count.append(1)
        return real(lowered)

    monkeypatch.setattr(program_store, "compile_fresh", counted)
    return count


def new_search(graphdef, mesh, max_steps=10, beam=1):
    """A search with nothing in memory (compiled_search keeps one per setting per process)."""
    return search._compiled_search.__wrapped__(graphdef, beam, 0.6, 1, max_steps, None, "float32", mesh)


def batch_args(tok, mesh, rows=4):
    ids = tok.encode_src(SENTENCES[:rows])
    src = np.full((rows, 16), PAD_ID, np.int32)
    for r, seq in enumerate(ids):
        src[r, : len(seq)] = seq
    batch = sharding.put_batch(mesh, {"src": src, "max_lens": np.full((rows,), 10, np.int32),
                                      "prefix": np.zeros((rows, 0), np.int32), "prefix_lens": np.zeros((rows,), np.int32),
                                      "row_ids": np.arange(rows, dtype=np.int32)})
    return batch["src"], batch["max_lens"], batch["prefix"], batch["prefix_lens"], batch["row_ids"], np.uint32(0)


def outputs(fn, params, args):
    return [np.asarray(x) for x in jax.device_get(fn(params, *args))]


@pytest.mark.parametrize("beam", [1, 4])
def test_stored_program_translates_as_the_compiled_one(loaded_run, store, compiles, beam):
    cfg, graphdef, params, tok, mesh = loaded_run
    args = batch_args(tok, mesh)
    fresh = new_search(graphdef, mesh, beam=beam)
    jitted = outputs(lambda p, *batch: fresh.jitted(p, fresh.prepared(p), *batch), params, args)  # no store
    first = outputs(new_search(graphdef, mesh, beam=beam), params, args)
    assert len(compiles) == 1 and len(list(store.glob("*.program"))) == 1
    second = outputs(new_search(graphdef, mesh, beam=beam), params, args)  # as a new process would
    assert len(compiles) == 1, "the second search compiled instead of reading the store"
    assert (jitted[0] != PAD_ID).any()  # real tokens, not an empty search
    for want, a, b in zip(jitted, first, second):
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)


def test_settings_shapes_and_code_get_their_own_programs(loaded_run, store, compiles, monkeypatch):
    cfg, graphdef, params, tok, mesh = loaded_run
    new_search(graphdef, mesh)(params, *batch_args(tok, mesh))
    new_search(graphdef, mesh, max_steps=12)(params, *batch_args(tok, mesh))  # another step limit
    new_search(graphdef, mesh)(params, *batch_args(tok, mesh, rows=2))  # another row count
    assert len(compiles) == 3 and len(list(store.glob("*.program"))) == 3
    with jax.default_matmul_precision("highest"):  # a jax setting that changes the trace
        new_search(graphdef, mesh)(params, *batch_args(tok, mesh))
    assert len(compiles) == 4, "a program stored under other jax settings was run"
    monkeypatch.setattr(program_store, "code_fingerprint", lambda: "edited code")
    new_search(graphdef, mesh)(params, *batch_args(tok, mesh))
    assert len(compiles) == 5, "a program stored by other code was run"


def test_damaged_program_is_compiled_again(loaded_run, store, compiles):
    cfg, graphdef, params, tok, mesh = loaded_run
    args = batch_args(tok, mesh)
    want = outputs(new_search(graphdef, mesh), params, args)
    (path,) = store.glob("*.program")
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk
    got = outputs(new_search(graphdef, mesh), params, args)
    assert len(compiles) == 2
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert path.stat().st_size > 1000  # written again, whole


def test_model_structure_is_remembered(loaded_run, store, monkeypatch):
    cfg, graphdef, params, tok, mesh = loaded_run
    traced = rundir.abstract_model(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    assert len(list((store.parent / "models").glob("*.pickle"))) == 1
    monkeypatch.setattr(rundir.nnx, "eval_shape", lambda *a, **k: pytest.fail("traced the model again"))
    read = rundir.abstract_model(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    assert read[0] == traced[0] == graphdef
    assert jax.tree.structure(read[1]) == jax.tree.structure(traced[1])
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(read[1])] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(params)]


def test_prune_keeps_the_most_recently_used(tmp_path):
    for k in range(10):
        path = tmp_path / f"{k}.program"
        path.write_bytes(b"x")
        os.utime(path, (1000 + k, 1000 + k))
    os.utime(tmp_path / "0.program", (5000, 5000))  # used lately
    (tmp_path / "other.pickle").write_bytes(b"x")
    program_store.prune(tmp_path, keep=5)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["0.program", "7.program", "8.program", "9.program", "other.pickle"]


ONE_DEVICE_SCRIPT = """
import json, sys
import jax
from transformer_mt import compile_cache, program_store, sharding
compile_cache.enable(sys.argv[3])
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from

loads = []
jax.monitoring.register_event_listener(lambda event, **_: event == program_store.LOAD_EVENT and loads.append(1))
cfg, graphdef, params, tok, step, mesh = load_run(sys.argv[1])
lines = json.loads(sys.argv[2])
settings = settings_from(cfg, beam_size=1)
both = Translator(cfg, graphdef, tok, mesh).translate_lines(params, lines, settings)
second = sharding.make_mesh(jax.devices()[1:])
alone = Translator(cfg, graphdef, tok, second).translate_lines(sharding.put_state(second, params), lines, settings)
print(json.dumps({"devices": len(jax.devices()), "both": both, "second": alone, "loads": len(loads)}))
"""


def test_program_for_one_of_two_devices_loads_onto_it(trained_run, tmp_path):
    """In a process with 2 devices, a search over a mesh of the second device alone is stored, then
    read back by a new process onto that device, and translates as the search over both devices.
    Loaded without its device, such a program expected arguments on both and failed."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    lines = SENTENCES * 2
    runs = []
    for _ in range(2):  # the first process compiles and stores, the second loads
        out = subprocess.run([sys.executable, "-c", ONE_DEVICE_SCRIPT, str(trained_run), json.dumps(lines),
                              str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    assert runs[0]["devices"] == 2 and runs[0]["loads"] == 0
    assert runs[1]["loads"] == 2  # the two-device and the one-device program, from the store
    for run in runs:  # the same texts; scores summed in another order by another program
        assert [[text for text, _ in hyps] for hyps in run["second"]] == [[text for text, _ in hyps] for hyps in run["both"]]
        assert [score for hyps in run["second"] for _, score in hyps] == pytest.approx(
            [score for hyps in run["both"] for _, score in hyps], abs=1e-4)


def test_shapes_loaded_once_are_not_loaded_again(loaded_run, store, monkeypatch):
    """A server decodes many cycles of the same few batch shapes: after the first, translate_ids
    builds no filler batches to load programs it holds (they cost 17% of the batching thread);
    new params load them again."""
    cfg, graphdef, params, tok, mesh = loaded_run
    translator = search.Translator(cfg, graphdef, tok, mesh)
    settings = search.settings_from(cfg, beam_size=1, max_len_a=0.0, max_len_b=5)
    ids = tok.encode_src(SENTENCES * 75)  # a full batch of rows and a smaller one: two programs
    rows = {rows for _, rows, _ in search.plan_batches([len(x) for x in ids], translator.buckets,
                                                        settings.batch_tokens, sharding.data_size(mesh),
                                                        translator.rows_for, True)}
    assert len(rows) == 2
    fillers = []
    real = translator.filler_batch
    monkeypatch.setattr(translator, "filler_batch", lambda *a, **k: fillers.append(a) or real(*a, **k))
    first = translator.translate_ids(params, ids, settings)
    assert len(fillers) == 2
    assert translator.translate_ids(params, ids, settings) == first
    assert len(fillers) == 2, "programs already loaded were loaded again"
    translator.translate_ids(jax.tree.map(lambda x: x + 0, params), ids, settings)  # other params
    assert len(fillers) == 4
