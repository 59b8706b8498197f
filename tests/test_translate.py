"""Translation and evaluation end to end on a small trained run (see conftest.trained_run)."""

import json

import pytest
import sacrebleu
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import cli, cli_here
from transformer_mt import translate as tr

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
    assert tr.resolve_step(trained_run, None, False)[1] == best_step
    assert tr.resolve_step(trained_run, None, True)[1] == 400


@pytest.fixture(scope="module")
def loaded(trained_run):
    cfg, graphdef, params, tok, step, mesh = tr.load_run(trained_run)
    return cfg, tr.Translator(cfg, graphdef, tok, mesh), params


def test_line_count_order_and_empty_lines(loaded):
    cfg, translator, params = loaded
    settings = tr.settings_from(cfg, beam_size=2, batch_tokens=64)  # several batches and buckets
    out = tr.translate_lines(translator, params, SOURCES, settings, progress=False)
    assert len(out) == len(SOURCES)
    texts = [h[0][0] for h in out]
    assert texts[1] == "" and texts[4] == ""
    assert texts[0] == texts[3]  # duplicates translate alike, wherever they land in the batches
    assert all(t for i, t in enumerate(texts) if i not in (1, 4))
    alone = [h[0][0] for h in tr.translate_lines(translator, params, [SOURCES[2]], settings, progress=False)]
    assert alone[0] == texts[2]  # same result alone as in a mixed batch: order restored


def test_beam_never_scores_below_greedy(loaded):
    cfg, translator, params = loaded
    sentences = [s for s in SOURCES if s.strip()]
    ids = translator.tok.encode_src(sentences)
    greedy = translator.translate_ids(params, ids, tr.settings_from(cfg, beam_size=1), progress=False)
    beam = translator.translate_ids(params, ids, tr.settings_from(cfg, beam_size=4, alpha=0.0), progress=False)
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
    r = cli("translate", "--checkpoint", str(trained_run), "--beam", "4", "--buffer-lines", "3",
            input=src.read_bytes())
    assert r.returncode == 0 and r.stdout.decode("utf-8") == out.read_text(encoding="utf-8")
    assert "Traceback" not in r.stderr.decode()
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
                max_size=6))
def test_hostile_unicode_keeps_one_line_per_input(loaded, lines):
    cfg, translator, params = loaded
    raw = b"\n".join(line.encode("utf-8", errors="surrogatepass") for line in lines)
    raw += b"\xff\xfe\r\n\t\x00\xe2\x80\xa8\n"  # invalid UTF-8, CRLF, NUL, U+2028
    decoded = list(tr.decode_lines(raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"), "t"))
    out = tr.translate_lines(translator, params, decoded, tr.settings_from(cfg, beam_size=1), progress=False)
    assert len(out) == len(decoded)
    text = "".join(h[0][0] + "\n" for h in out)
    assert text.count("\n") == len(decoded) and len(text.split("\n")) == len(decoded) + 1
    assert all(len(h[0][0].splitlines()) <= 1 for h in out)
