"""The token store: equal to direct tokenization, keyed by what decides it, built atomically,
streamed from every kind of source (local hub-layout datasets included), bad lines reported."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import ROOT, TINY, FAST
from transformer_mt import corpus, data as data_lib, store as store_lib, tokenizer as tok_lib
from transformer_mt.config import ConfigError, DataConfig, TokenizerConfig

MULTI30K = ROOT / "data" / "multi30k"


def read_gz(name, n):
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:n]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tok_lib.train(TokenizerConfig(vocab_size=400), read_gz("train.en.gz", 2000), read_gz("train.de.gz", 2000),
                         tmp_path_factory.mktemp("spm"))


def same_pairs(a: data_lib.Examples, b: data_lib.Examples) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.src, b.src)) and all(
        np.array_equal(x, y) for x, y in zip(a.tgt, b.tgt))


def text_pair(tmp_path, src, tgt):
    a, b = tmp_path / "c.en", tmp_path / "c.de"
    a.write_text("".join(s + "\n" for s in src), encoding="utf-8")
    b.write_text("".join(t + "\n" for t in tgt), encoding="utf-8")
    return [str(a), str(b)]


@pytest.mark.parametrize("workers", [0, 2])
def test_store_equals_direct_tokenization(tok, tmp_path, workers):
    src, tgt = read_gz("train.en.gz", 3000), read_gz("train.de.gz", 3000)
    cfg = DataConfig(train_files=(str(MULTI30K / "train.en.gz"), str(MULTI30K / "train.de.gz")), max_len=24,
                     max_train_examples=3000, store_dir=str(tmp_path))
    monkey = store_lib.CHUNK_PAIRS
    store_lib.CHUNK_PAIRS = 700  # several chunks, the last one short
    try:
        pairs, directory = store_lib.open_or_build(cfg, tok, progress=False, workers=workers)
    finally:
        store_lib.CHUNK_PAIRS = monkey
    direct = data_lib.tokenize_pairs(tok, src, tgt, 24)
    assert 500 < len(pairs) < 3000 and same_pairs(pairs, direct)
    assert isinstance(pairs.readers["src"], data_lib.FileSide) and pairs.readers["src"].dtype == np.uint16
    meta = json.loads((directory / store_lib.META).read_text())
    assert meta["read"] == 3000 and meta["dropped"]["too_long"] == 3000 - len(direct)


def test_store_key_follows_inputs_tokenizer_and_filter(tok, tmp_path):
    files = text_pair(tmp_path, ["a dog runs", "two cats"], ["ein Hund läuft", "zwei Katzen"])
    cfg = DataConfig(train_files=tuple(files), max_len=32)
    key = store_lib.store_key(cfg, tok.paths)
    assert store_lib.store_key(cfg, tok.paths) == key
    assert store_lib.store_key(replace(cfg, max_len=31), tok.paths) != key
    assert store_lib.store_key(replace(cfg, max_train_examples=1), tok.paths) != key
    other = tok_lib.train(TokenizerConfig(vocab_size=300), read_gz("train.en.gz", 500), read_gz("train.de.gz", 500),
                          tmp_path / "other")
    assert store_lib.store_key(cfg, other.paths) != key
    (tmp_path / "c.de").write_text("ein Hund rennt\nzwei Katzen\n", encoding="utf-8")  # same size, new text
    assert store_lib.store_key(cfg, tok.paths) != key


def test_stopped_build_leaves_no_store(tok, tmp_path):
    cfg = DataConfig(train_files=(str(MULTI30K / "train.en.gz"), str(MULTI30K / "train.de.gz")), max_len=32,
                     store_dir=str(tmp_path))
    calls = []

    def stop_after_first_chunk():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(corpus.Interrupted):
        store_lib.open_or_build(cfg, tok, progress=False, should_stop=stop_after_first_chunk)
    assert list(tmp_path.iterdir()) == []


def launch_held_build(tmp_path, store_dir):
    env = {**os.environ, store_lib.HOLD_ENV: "1", "TRANSFORMER_MT_STORE_DIR": str(store_dir)}
    sets = [a for o in FAST + ["data.max_train_examples=3000", "train.max_steps=1"] for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "transformer_mt.cli", "train", "--config", str(TINY), *sets,
                             "--workdir", str(tmp_path / "run"), "--no-progress"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # waits for the event, not for a time
        if line.startswith("build held in"):
            return proc
    proc.wait()
    pytest.fail(f"the build never held (exit {proc.returncode})")


def test_sigterm_mid_build_exits_cleanly_and_sigkill_leaves_nothing_that_loads(tmp_path):
    stores = tmp_path / "stores"
    proc = launch_held_build(tmp_path, stores)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert "SIGTERM received while preparing the training data" in rest and "Traceback" not in rest
    assert list(stores.iterdir()) == []
    proc = launch_held_build(tmp_path, stores)
    proc.kill()
    proc.wait()
    half = list(stores.iterdir())
    assert len(half) == 1 and ".tmp-" in half[0].name  # the half-built store has no name that loads
    store_lib._remove_stale(stores)  # the next build clears it away
    assert list(stores.iterdir()) == []


def test_mismatched_line_counts_name_both(tok, tmp_path):
    files = text_pair(tmp_path, ["one", "two", "three"], ["eins", "zwei"])
    cfg = DataConfig(train_files=tuple(files), max_len=32, store_dir=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"c\.en has 3 lines, .*c\.de has 2"):
        store_lib.open_or_build(cfg, tok, progress=False)
    assert not any((tmp_path / "s").iterdir())


def test_bad_lines_are_counted_and_reported_once(tok, tmp_path, capsys):
    src = ["a dog runs .", "", "a cat " * 40, "two dogs", "ok then", "", "fine ."]
    tgt = ["ein Hund läuft .", "leer", "eine Katze " * 40, "", "gut", "", "gut ."]
    files = text_pair(tmp_path, src, tgt)
    raw = (tmp_path / "c.en").read_bytes().replace(b"ok then", b"ok \xff then")
    (tmp_path / "c.en").write_bytes(raw)
    cfg = DataConfig(train_files=tuple(files), max_len=32, store_dir=str(tmp_path / "s"))
    pairs, directory = store_lib.open_or_build(cfg, tok, progress=False)
    assert len(pairs) == 3
    err = capsys.readouterr().err.splitlines()
    assert "training data: 3 pairs with an empty side dropped (first at line 2, 4, 6)" in err
    assert "training data: 1 pairs longer than data.max_len=32 tokens dropped (first at line 3)" in err
    assert "training data: 1 lines with invalid UTF-8 (replaced by U+FFFD) (first at line 5)" in err
    store_lib.open_or_build(cfg, tok, progress=False)  # the second launch reads the store: no report
    assert capsys.readouterr().err == ""


def test_tsv_and_jsonl_stores_equal_parallel_text(tok, tmp_path):
    src, tgt = read_gz("val.en.gz", 300), read_gz("val.de.gz", 300)
    want = data_lib.tokenize_pairs(tok, src, tgt, 40)
    tsv = tmp_path / "p.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in zip(src, tgt)), encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    corpus.write_jsonl_pairs(jsonl, src, tgt, "en", "de")
    for f in (tsv, jsonl):
        cfg = DataConfig(train_files=(str(f),), max_len=40, store_dir=str(tmp_path / "s"))
        assert same_pairs(store_lib.open_or_build(cfg, tok, progress=False)[0], want)
    tsv.write_text("one\ttwo\nthree\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p\.tsv line 2: expected 2 tab-separated fields, found 1"):
        store_lib.open_or_build(DataConfig(train_files=(str(tsv),), store_dir=str(tmp_path / "s")), tok, False)


def test_hub_layout_dataset_directory_streams_into_the_store(tok, tmp_path):
    """data.dataset pointed at a local directory laid out like a hub `translation` dataset
    (parquet shards under data/): loaded in streaming mode, offline, as the hub path runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, tgt = read_gz("train.en.gz", 1200), read_gz("train.de.gz", 1200)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k, part in enumerate((slice(0, 700), slice(700, 1200))):
        table = pa.table({"translation": [{"de": t, "en": s} for s, t in zip(src[part], tgt[part])]})
        pq.write_table(table, tmp_path / "hub" / "data" / f"train-0000{k}-of-00002.parquet")
    cfg = DataConfig(dataset=str(tmp_path / "hub"), train_split="train", max_len=32, store_dir=str(tmp_path / "s"))
    pairs, _ = store_lib.open_or_build(cfg, tok, progress=False)
    assert same_pairs(pairs, data_lib.tokenize_pairs(tok, src, tgt, 32))
    assert corpus.read_hub(str(tmp_path / "hub"), "", "train", "en", "de") == (src, tgt)
    sample = corpus.sample_pairs(cfg, 100, seed=0)
    assert len(sample[0]) == 100 and set(zip(*sample)) <= set(zip(src, tgt))
    with pytest.raises(ConfigError, match="lack languages 'en'/'fr'"):
        store_lib.open_or_build(replace(cfg, tgt_lang="fr"), tok, progress=False)


def test_tokenizer_sample_is_the_whole_small_corpus_in_order(tmp_path):
    src, tgt = read_gz("val.en.gz", 50), read_gz("val.de.gz", 50)
    cfg = DataConfig(train_files=tuple(text_pair(tmp_path, src, tgt)))
    assert corpus.sample_pairs(cfg, 1000, seed=0) == (src, tgt)
    a, b = corpus.sample_pairs(cfg, 10, seed=0)
    assert len(a) == 10 and all(tgt[src.index(s)] == t for s, t in zip(a, b))
    assert (a, b) != corpus.sample_pairs(cfg, 10, seed=1)


def test_large_tokenizer_sample_trains_in_a_child_that_a_stop_ends(tmp_path, monkeypatch):
    src, tgt = read_gz("train.en.gz", 1500), read_gz("train.de.gz", 1500)
    cfg = TokenizerConfig(vocab_size=300)
    monkeypatch.setattr(tok_lib, "CHILD_PROCESS_LINES", 1000)
    tok_lib.train(cfg, src, tgt, tmp_path / "child", 0, should_stop=lambda: False)
    tok_lib.train(cfg, src, tgt, tmp_path / "here", 0)
    assert (tmp_path / "child" / "spm.model").read_bytes() == (tmp_path / "here" / "spm.model").read_bytes()
    polls = []
    with pytest.raises(corpus.Interrupted):  # the first poll comes after the child started
        tok_lib.train(cfg, src, tgt, tmp_path / "stopped", 0, should_stop=lambda: polls.append(1) or True)
    assert polls == [1] and not (tmp_path / "stopped" / "spm.model").exists()
