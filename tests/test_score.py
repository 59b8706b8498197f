"""`score`: teacher-forced log-probabilities of given targets, on the shared trained run."""

import math

import pytest

from conftest import cli_here
from transformer_mt.search import Translator
from transformer_mt.teacher_forcing import compiled_score

PAIRS = [
    ("A man is riding a bike .", "Ein Mann fährt Fahrrad ."),
    ("", ""),
    ("Two dogs play in the snow .", "Zwei Hunde spielen im Schnee ."),
    ("Kids .", ""),
    ("A woman in a red dress is walking down the street with her small child and a very large dog .",
     "Eine Frau in einem roten Kleid geht mit ihrem kleinen Kind und einem sehr großen Hund die Straße entlang ."),
    ("A man is riding a bike .", "Ein Mann fährt Fahrrad ."),
    ("A dog .", "Ein Hund ."),
]


@pytest.fixture(scope="module")
def loaded(loaded_run):
    return loaded_run


def test_batch_scores_equal_each_line_alone(loaded):
    cfg, graphdef, params, tok, mesh = loaded
    translator = Translator(cfg, graphdef, tok, mesh)
    batch_tokens = 64  # 4 rows of 16: several batches, and a 32 shape
    src = tok.encode_src([s for s, _ in PAIRS])
    tgt = tok.encode_tgt([t for _, t in PAIRS])
    assert max(len(s) for s in src) > cfg.data.bucket_lengths[-1]  # one pair longer than every bucket
    compiled = compiled_score(graphdef)._cache_size()
    totals, counts = translator.score_ids(params, src, tgt, batch_tokens)
    assert compiled_score(graphdef)._cache_size() - compiled <= 2  # one program per shape: [4, 16], [2, 32]
    assert list(counts) == [len(t) + 1 for t in tgt]  # EOS counted; an empty target is EOS alone
    assert all(math.isfinite(t) and t < 0 for t in totals)
    assert totals[0] == totals[5]  # duplicates score alike, wherever they land
    for i in range(len(PAIRS)):
        alone, n = translator.score_ids(params, [src[i]], [tgt[i]], batch_tokens)
        assert n[0] == counts[i]
        assert alone[0] == pytest.approx(totals[i], abs=1e-4), PAIRS[i]
    assert compiled_score(graphdef)._cache_size() - compiled <= 2  # alone: the same shapes again


def test_cli_score_one_line_per_input_line(loaded, trained_run, tmp_path):
    cfg, graphdef, params, tok, mesh = loaded
    src, tgt = tmp_path / "src.en", tmp_path / "tgt.de"
    src.write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    r = cli_here("score", "--checkpoint", str(trained_run), "--src", str(src), "--tgt", str(tgt), "--alpha", "1.0")
    assert r.returncode == 0, r.stderr.decode()
    rows = [[float(x) for x in line.split("\t")] for line in r.stdout.decode().splitlines()]
    assert len(rows) == len(PAIRS) and all(len(row) == 3 for row in rows)
    totals, counts = Translator(cfg, graphdef, tok, mesh).score_ids(
        params, tok.encode_src([s for s, _ in PAIRS]), tok.encode_tgt([t for _, t in PAIRS]))
    for (total, per_token, normalised), t, n in zip(rows, totals, counts):
        assert total == pytest.approx(t, abs=1e-3)
        assert per_token == pytest.approx(t / n, abs=1e-3)
        assert normalised == pytest.approx(t / ((5 + n) / 6), abs=1e-3)  # GNMT penalty, alpha 1

    short = tmp_path / "short.de"
    short.write_text("Ein Hund .\n", encoding="utf-8")
    r = cli_here("score", "--checkpoint", str(trained_run), "--src", str(src), "--tgt", str(short))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"has {len(PAIRS)} lines but" in err and "short.de has 1" in err, err
