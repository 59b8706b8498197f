"""Translation and evaluation end to end on a small trained run (see conftest.trained_run)."""

import json
import os
import sys

import pytest
import sacrebleu
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT, cli, cli_here
from transformer_mt import rundir
from transformer_mt import search
from transformer_mt.translate import translate_stream

sys.path.insert(0, str(ROOT / "benchmarks"))
import hostile_translate  # noqa: E402

SOURCES = [
    "A man is riding a bike .",
    "",
    "Two dogs play in the snow .",
    "A man is riding a bike .",
    "   ",
    "A woman in a red dress is walking down the street with her small child and a very large dog .",
    "Kids .",
]


def test_training_validates_bleu_and_keeps_best(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    bleu = [r for r in records if "bleu" in r]
    assert [r["step"] for r in bleu] == [200, 400] and all(r["split"] == "valid" for r in bleu)
    best_step = max(bleu, key=lambda r: r["bleu"])["step"]
    assert [p.name for p in (trained_run / "best").iterdir() if p.name.isdigit()] == [str(best_step)]
    assert rundir.resolve_step(trained_run, None, False)[1] == best_step
    assert rundir.resolve_step(trained_run, None, True)[1] == 400


@pytest.fixture(scope="module")
def loaded(trained_run):
    cfg, graphdef, params, tok, step, mesh = rundir.load_run(trained_run)
    return cfg, search.Translator(cfg, graphdef, tok, mesh), params


def test_line_count_order_and_empty_lines(loaded):
    cfg, translator, params = loaded
    settings = search.settings_from(cfg, beam_size=2, batch_tokens=64)  # several batches and buckets
    out = translator.translate_lines(params, SOURCES, settings, progress=False)
    assert len(out) == len(SOURCES)
    texts = [h[0][0] for h in out]
    assert texts[1] == "" and texts[4] == ""
    assert texts[0] == texts[3]  # duplicates translate alike, wherever they land in the batches
    assert all(t for i, t in enumerate(texts) if i not in (1, 4))
    alone = [h[0][0] for h in translator.translate_lines(params, [SOURCES[2]], settings, progress=False)]
    assert alone[0] == texts[2]  # same result alone as in a mixed batch: order restored


def test_beam_never_scores_below_greedy(loaded):
    cfg, translator, params = loaded
    sentences = [s for s in SOURCES if s.strip()]
    ids = translator.tok.encode_src(sentences)
    greedy = translator.translate_ids(params, ids, search.settings_from(cfg, beam_size=1), progress=False)
    beam = translator.translate_ids(params, ids, search.settings_from(cfg, beam_size=4, alpha=0.0), progress=False)
    for g, b in zip(greedy, beam):
        # beam returns log-prob / lp with alpha=0, i.e. the model score; greedy the same sum.
        assert b[0][1] >= g[0][1] - 1e-4
        assert 3 not in b[0][0] and 3 not in g[0][0]  # cut at EOS, nothing after


def test_cli_translate_file_stdin_and_evaluate(trained_run, tmp_path):
    src = tmp_path / "src.en"
    src.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    out = tmp_path / "hyp.de"
    r = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(src), "-o", str(out), "--beam", "4",
                 "--no-progress")
    assert r.returncode == 0, r.stderr.decode()
    hyps = out.read_text(encoding="utf-8").split("\n")
    assert len(hyps) == len(SOURCES) + 1 and hyps[-1] == ""  # one line per input line
    # The real entry point, once, in a subprocess: stdin piped in chunks of 3 lines, stdout piped out.
    # It splits the CPU into two devices (--cpu-devices 2, the default for files), this process runs
    # on one: the same translations.
    r = cli("translate", "--checkpoint", str(trained_run), "--beam", "4", "--buffer-lines", "3", "--cpu-devices", "2",
            input=src.read_bytes())
    assert r.returncode == 0 and r.stdout.decode("utf-8") == out.read_text(encoding="utf-8")
    devices = min(2, len(os.sched_getaffinity(0)))
    assert "Traceback" not in r.stderr.decode() and f"on {devices} cpu device(s)" in r.stderr.decode()
    greedy_here = cli_here("translate", "--checkpoint", str(trained_run), "--beam", "1", "-i", str(src))
    greedy = cli("translate", "--checkpoint", str(trained_run), "--beam", "1", "--cpu-devices", "2",
                 input=src.read_bytes())
    assert greedy.returncode == 0 and greedy.stdout == greedy_here.stdout
    r = cli_here("translate", "--checkpoint", str(trained_run), "--beam", "3", "--nbest", "2", "-i", str(src))
    assert len(r.stdout.decode().splitlines()) == 2 * len(SOURCES)
    ref = tmp_path / "ref.de"
    ref.write_text("Ein Mann fährt Fahrrad .\n\nZwei Hunde spielen im Schnee .\nEin Mann fährt ein Fahrrad .\n\n"
                   "Eine Frau geht mit ihrem Kind und einem großen Hund die Straße entlang .\nKinder .\n",
                   encoding="utf-8")
    r = cli_here("evaluate", "--hyp", str(out), "--ref", str(ref), "--json")
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    refs = ref.read_text(encoding="utf-8").splitlines()
    hyp_lines = out.read_text(encoding="utf-8").splitlines()
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp_lines, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyp_lines, [refs]).score)
    assert got["bleu_signature"].startswith("nrefs:1")
    r = cli_here("evaluate", "--checkpoint", str(trained_run), "--src", str(src), "--ref", str(ref), "--beam", "4")
    assert r.returncode == 0 and "BLEU = " in r.stdout.decode() and "chrF" in r.stdout.decode()


def test_user_errors_are_one_line(trained_run, tmp_path):
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("a\n")
    cases = [
        (["translate", "--checkpoint", str(tmp_path / "nope")], "run directory not found"),
        (["translate", "--checkpoint", str(empty_run)], "not a run directory"),
        (["translate", "--checkpoint", str(trained_run), "-i", str(tmp_path / "missing.txt")], "input file not found"),
        (["translate", "--checkpoint", str(trained_run), "--step", "999999"], "no checkpoint for step 999999"),
        (["evaluate", "--hyp", str(short), "--ref", "data/multi30k/val.de.gz"], "has 1 lines but"),
    ]
    for k, (args, fragment) in enumerate(cases):
        r = (cli if k == 0 else cli_here)(*args, input=b"")  # the first through the real entry point
        err = r.stderr.decode().strip()
        assert r.returncode == 2, err
        assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


LINE = st.one_of(
    st.binary(max_size=60),  # mostly invalid UTF-8
    st.text(max_size=60).map(lambda t: t.encode("utf-8", errors="surrogatepass")),  # any code point, lone surrogates too
    st.sampled_from(hostile_translate.HOSTILE),
    st.integers(20, 200).map(lambda n: b"a very long line " * n),  # longer than the model's 16 tokens
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_hostile_bytes_keep_one_line_per_input(loaded, tmp_path_factory, lines, newline, final_newline):
    cfg, translator, params = loaded
    raw = newline.join(lines) + (newline if final_newline and lines else b"")
    expected = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)  # what `wc -l` + 1 partial counts
    src = tmp_path_factory.mktemp("hostile") / "src.txt"
    src.write_bytes(raw)
    out = src.with_name("out.txt")
    n = translate_stream(translator, params, search.settings_from(cfg, beam_size=1), str(src), str(out))
    produced = out.read_bytes()
    assert n == expected and produced.count(b"\n") == expected and (produced.endswith(b"\n") or not produced)
    produced.decode("utf-8")  # valid UTF-8 out, whatever came in


def test_hostile_file_through_a_pipe_and_a_file(trained_run, tmp_path, capsys):
    lines = hostile_translate.hostile_lines(120, seed=1)
    raw = b"".join(line + (b"\r\n" if i % 5 == 0 else b"\n") for i, line in enumerate(lines))
    src = tmp_path / "hostile.txt"
    src.write_bytes(raw)
    r = cli_here("translate", "--checkpoint", str(trained_run), "--buffer-lines", "7", input=raw)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.count(b"\n") == len(lines)
    err = r.stderr.decode()
    bad_utf8 = [i + 1 for i, line in enumerate(lines) if not _is_utf8(line)]
    named = [int(w.split(" line ")[1].split(":")[0]) for w in err.splitlines() if "invalid UTF-8" in w]
    assert named == bad_utf8  # one warning per bad line, naming it, across stdin chunks
    long_warnings = [w for w in err.splitlines() if "tokens, longer than" in w]
    assert 0 < len(long_warnings) <= search.MAX_LINE_WARNINGS
    assert "were longer than 16 tokens" in err and "Traceback" not in err
    out = tmp_path / "out.txt"
    r = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(src), "-o", str(out))
    assert r.returncode == 0 and out.read_bytes() == cli_here(
        "translate", "--checkpoint", str(trained_run), input=raw).stdout  # file and pipe agree


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
