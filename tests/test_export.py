"""`transformer-mt export --format ctranslate2`: the exported model decodes and scores as ours.

Both sides really differ: our JAX model and search against CTranslate2's C++ runtime reading the
converted weights. A wrong position table (CTranslate2's own starts at 1), a swapped fused
projection, a missing final norm or a wrong epsilon changes the log-probabilities by far more
than the tolerance and the translations of most lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from conftest import ROOT, cli_here, tiny_config

ctranslate2 = pytest.importorskip("ctranslate2")

from transformer_mt import export, export_check  # noqa: E402
from transformer_mt.rundir import load_run  # noqa: E402
from transformer_mt.search import Translator, settings_from  # noqa: E402
from transformer_mt.textio import clean_line, read_lines  # noqa: E402

LINES = 200  # test_2016 source lines compared


@pytest.fixture(scope="module")
def post_norm_run(tmp_path_factory):
    """A tiny post-norm model (LN(x + f(x)), no final norms), 200 steps on the FAST data."""
    from transformer_mt.trainer import train

    workdir = tmp_path_factory.mktemp("post-norm")
    train(tiny_config("model.pre_norm=false", "train.max_steps=200"), workdir, progress_bar=False)
    return workdir


def exported(run, directory, *extra):
    result = cli_here("export", "--checkpoint", str(run), "-o", str(directory), *extra)
    assert result.returncode == 0, result.stderr.decode()
    return directory


def compare(run, model_dir):
    """(lines whose greedy outputs differ, lines whose beam-4 outputs differ, largest per-token
    log-probability difference) between our run and its CTranslate2 export, on LINES lines."""
    cfg, graphdef, params, tok, _, mesh = load_run(run)
    limit = cfg.data.bucket_lengths[-1] - 1  # our translate cuts longer sources (with a warning)
    lines = [clean_line(x) for x in read_lines(cfg.data.test_files[0])[:LINES]]
    pieces = [tok.src.encode(x, out_type=str)[:limit] for x in lines]
    src_ids = [[tok.src.piece_to_id(p) for p in x] + [3] for x in pieces]
    translator = Translator(cfg, graphdef, tok, mesh)
    ct2 = ctranslate2.Translator(str(model_dir), device="cpu", compute_type="float32", intra_threads=1)
    differ = {}
    for beam in (1, 4):
        settings = settings_from(cfg, beam_size=beam, alpha=0.0)
        ours = [[tok.tgt.id_to_piece(i) for i in h[0][0]] for h in translator.translate_ids(params, src_ids, settings)]
        theirs = export_check.ct2_translate(ct2, pieces, settings, beam)
        differ[beam] = [i for i in range(len(lines)) if ours[i] != theirs[i]]
        if beam == 1:
            greedy = ours
    references = [tok.tgt.encode(clean_line(x), out_type=str) for x in read_lines(cfg.data.test_files[1])[:LINES]]
    worst = 0.0
    for targets in (greedy, references):
        ours = export_check.our_token_logprobs(graphdef, params, src_ids,
                                               [[tok.tgt.piece_to_id(p) for p in t] for t in targets])
        theirs = export_check.ct2_token_logprobs(ct2, pieces, targets)
        worst = max(worst, max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs)))
    return differ[1], differ[4], worst


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_float32_export_decodes_and_scores_as_ours(norm, trained_run, post_norm_run, tmp_path):
    run = trained_run if norm == "pre" else post_norm_run
    model_dir = exported(run, tmp_path / "ct2")
    assert sorted(os.listdir(model_dir)) == ["config.json", "model.bin", "shared_vocabulary.json", "spm.model",
                                             "tokenize.json"]
    assert json.loads((model_dir / "tokenize.json").read_text())["source_spm"] == "spm.model"
    greedy_differ, beam_differ, worst = compare(run, model_dir)
    assert greedy_differ == [], f"greedy outputs differ on lines {greedy_differ}"
    assert beam_differ == [], f"beam-4 outputs differ on lines {beam_differ}"
    assert worst < 1e-4, f"teacher-forced log-probabilities differ by up to {worst}"


def test_int8_export_loads_and_translates(trained_run, tmp_path):
    model_dir = exported(trained_run, tmp_path / "int8", "--quantization", "int8")
    assert json.loads((model_dir / "tokenize.json").read_text())["quantization"] == "int8"
    ct2 = ctranslate2.Translator(str(model_dir), compute_type="int8")
    out = ct2.translate_batch([["▁A", "▁man", "."]], beam_size=2, max_decoding_length=8)
    assert out[0].hypotheses[0]


def one_line_error(result, *words):
    err = result.stderr.decode().strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_rotary_positions_are_refused_with_one_line(trained_run, tmp_path):
    run = tmp_path / "rotary"
    shutil.copytree(trained_run, run)
    config = (run / "config.yaml").read_text()
    assert "positional: sinusoidal" in config
    (run / "config.yaml").write_text(config.replace("positional: sinusoidal", "positional: rotary"))
    result = cli_here("export", "--checkpoint", str(run), "-o", str(tmp_path / "out"))
    one_line_error(result, "model.positional=rotary", "CTranslate2")
    assert not (tmp_path / "out").exists()


def test_missing_ctranslate2_is_one_line_naming_it(trained_run, tmp_path):
    with mock.patch.dict(sys.modules, {"ctranslate2": None, "ctranslate2.converters": None}):
        result = cli_here("export", "--checkpoint", str(trained_run), "-o", str(tmp_path / "out"))
    one_line_error(result, "ctranslate2", "pip install")
    assert not (tmp_path / "out").exists()


def test_existing_directory_is_not_overwritten(trained_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    one_line_error(cli_here("export", "--checkpoint", str(trained_run), "-o", str(tmp_path / "out")), "exists")
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def test_failed_export_leaves_nothing(trained_run, tmp_path):
    def fail(spec, directory, quantization):
        (directory / "model.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with mock.patch.object(export, "_write", fail):
        result = cli_here("export", "--checkpoint", str(trained_run), "-o", str(tmp_path / "out"))
    one_line_error(result, "No space left")
    assert os.listdir(tmp_path) == []  # neither DIR nor its temporary directory


KILLED_EXPORT = """
import os, sys, threading
from transformer_mt import export
write = export._write
def write_then_hang(spec, directory, quantization):
    write(spec, directory, quantization)
    print("written", flush=True)  # the model is written; DIR is not yet in place
    threading.Event().wait()
export._write = write_then_hang
export.export(sys.argv[1], sys.argv[2])
"""


def test_killed_export_leaves_no_directory(trained_run, tmp_path):
    out = tmp_path / "out" / "model"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(trained_run), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = proc.stdout.readline()  # waits for the child to get there (or to die)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert said == b"written\n", err.decode()
    assert not out.exists()
