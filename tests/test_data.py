"""Data: local formats, line-count checks, SentencePiece round trip, bucketed and packed batching."""

import gzip
import json
import unicodedata
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from transformer_mt import corpus
from transformer_mt import data as data_lib
from transformer_mt import tokenizer as tok_lib
from transformer_mt.config import ConfigError, TokenizerConfig

MULTI30K = ROOT / "data" / "multi30k"


def read_gz(name, n=None):
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[:-1][:n] if n else lines[:-1]


def test_vendored_multi30k_line_counts():
    for split, n in (("train", 29000), ("val", 1014), ("test_2016_flickr", 1000)):
        for lang in ("en", "de", "fr"):
            assert len(read_gz(f"{split}.{lang}.gz")) == n


def test_local_parallel_text_gz_matches_raw_lines():
    src, tgt = corpus.read_local([str(MULTI30K / "val.en.gz"), str(MULTI30K / "val.de.gz")], "en", "de")
    assert src == read_gz("val.en.gz") and tgt == read_gz("val.de.gz")


def test_parallel_files_with_different_lengths_name_both(tmp_path):
    a, b = tmp_path / "a.en", tmp_path / "b.de"
    a.write_text("one\ntwo\nthree\n")
    b.write_text("eins\nzwei\n")
    with pytest.raises(ConfigError, match=r"a\.en has 3 lines, .*b\.de has 2"):
        corpus.read_local([str(a), str(b)], "en", "de")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data file not found: .*nope.en"):
        corpus.read_local([str(tmp_path / "nope.en"), str(tmp_path / "nope.de")], "en", "de")


def test_tsv_jsonl_and_hub_style_records(tmp_path):
    src, tgt = ["a dog runs .", "", "two \"quoted\" cats"], ["ein Hund läuft .", "leer", "zwei Katzen"]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in zip(src, tgt)), encoding="utf-8")
    assert corpus.read_local([str(tsv)], "en", "de") == (src, tgt)
    jsonl = tmp_path / "pairs.jsonl"
    corpus.write_jsonl_pairs(jsonl, src, tgt, "en", "de")
    assert corpus.read_local([str(jsonl)], "en", "de") == (src, tgt)
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in zip(src, tgt)))
    assert corpus.read_local([str(flat)], "en", "de") == (src, tgt)
    # The hub path, on a local dataset directory laid out like a hub repository.
    repo = tmp_path / "hub_like"
    repo.mkdir()
    corpus.write_jsonl_pairs(repo / "train.jsonl", src, tgt, "en", "de")
    assert corpus.read_hub(str(repo), "", "train", "en", "de") == (src, tgt)
    with pytest.raises(ConfigError, match="lack languages 'en'/'fr'"):
        corpus.read_hub(str(repo), "", "train", "en", "fr")


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    src, tgt = read_gz("train.en.gz", 3000), read_gz("train.de.gz", 3000)
    return tok_lib.train(TokenizerConfig(vocab_size=500), src, tgt, tmp_path_factory.mktemp("spm"))


def test_sentencepiece_round_trip_on_multi30k(spm_tok, tmp_path):
    lines = read_gz("val.de.gz", 200)
    ids = spm_tok.encode_tgt(lines)
    # SentencePiece applies NFKC and collapses whitespace (e.g. a no-break space in line 76).
    normalized = [" ".join(unicodedata.normalize("NFKC", line).split()) for line in lines]
    assert spm_tok.decode_tgt(ids) == normalized
    assert sum(n != line for n, line in zip(normalized, lines)) <= 2
    assert all(s[-1] == tok_lib.EOS_ID for s in spm_tok.encode_src(lines[:5]))
    assert (spm_tok.src.pad_id(), spm_tok.src.unk_id(), spm_tok.src.bos_id(), spm_tok.src.eos_id()) == (0, 1, 2, 3)
    spm_tok.save(tmp_path)
    again = tok_lib.load_from_run(tmp_path)
    assert again.encode_tgt(lines[:20]) == ids[:20]


def test_separate_vocabularies(tmp_path):
    src, tgt = read_gz("train.en.gz", 2000), read_gz("train.de.gz", 2000)
    tok = tok_lib.train(TokenizerConfig(vocab_size=300, joint=False, model_type="bpe"), src, tgt, tmp_path)
    assert not tok.joint and tok.tgt.decode(tok.encode_tgt(tgt[:10])) == tgt[:10]
    assert (tmp_path / "spm.src.model").is_file() and (tmp_path / "spm.tgt.model").is_file()


def test_trained_tokenizer_is_reused_from_the_cache(tmp_path):
    cfg = TokenizerConfig(vocab_size=300)
    src, tgt = read_gz("train.en.gz", 2000), read_gz("train.de.gz", 2000)
    cache = tmp_path / "cache"
    tok_lib.load_or_train(cfg, tmp_path / "a", lambda: (src, tgt), 0, cache)
    assert [p.name for p in cache.iterdir()] == [tok_lib.cache_key(cfg, src, tgt, 0)]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this tokenizer")

    with mock.patch.object(tok_lib, "train", no_training):
        tok_lib.load_or_train(cfg, tmp_path / "b", lambda: (src, tgt), 0, cache)
    model = (tmp_path / "a" / tok_lib.JOINT_FILE).read_bytes()
    assert (tmp_path / "b" / tok_lib.JOINT_FILE).read_bytes() == model
    # The cache relies on training being deterministic: a fresh training gives the same bytes.
    tok_lib.train(cfg, src, tgt, tmp_path / "c", 0)
    assert (tmp_path / "c" / tok_lib.JOINT_FILE).read_bytes() == model
    # Anything training reads is in the key.
    key = tok_lib.cache_key(cfg, src, tgt, 0)
    others = [tok_lib.cache_key(replace(cfg, vocab_size=301), src, tgt, 0), tok_lib.cache_key(cfg, src, tgt, 1),
              tok_lib.cache_key(cfg, src[:-1], tgt[:-1], 0), tok_lib.cache_key(cfg, tgt, src, 0),
              tok_lib.cache_key(cfg, src[:1] + [src[1] + src[2]] + src[3:], tgt, 0)]
    assert key not in others and len(set(others)) == len(others)


def test_batches_visit_every_pair_once_in_bucket_shapes(spm_tok):
    cfg = tiny_config("data.bucket_lengths=[8, 16, 24, 32]", "data.max_len=32", "data.batch_tokens=256").data
    src, tgt = read_gz("train.en.gz", 1500), read_gz("train.de.gz", 1500)
    examples = data_lib.tokenize_pairs(spm_tok, src, tgt, cfg.max_len)
    assert 900 < len(examples) < 1500  # some pairs exceed max_len and are dropped
    stream = data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4)
    plan = stream.plan(0)
    seen = [i for _, rows in plan for row in rows for i in row]
    assert all(len(row) <= 1 for _, rows in plan for row in rows)  # one pair a row
    assert sorted(seen) == list(range(len(examples)))  # each pair exactly once
    shapes = set()
    for _ in range(len(plan)):
        batch = next(stream)
        shapes.add(batch["src"].shape)
        assert batch["src"].shape == batch["tgt_in"].shape == batch["tgt_out"].shape
        real = batch["tgt_out"] != 0
        assert (batch["tgt_in"][:, 0][real[:, 0]] == tok_lib.BOS_ID).all()
    allowed = {(data_lib.rows_for_bucket(b, 256, 4), b) for b in cfg.bucket_lengths}
    assert shapes <= allowed and all(rows % 4 == 0 for rows, _ in shapes)
    assert stream.position == {"epoch": 0, "index": len(plan)}
    # The order is a pure function of (seed, epoch): a new stream resumes mid-epoch exactly.
    first = [next(stream) for _ in range(3)]
    again = data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4)
    again.set_position({"epoch": 1, "index": 0})
    for a in first:
        b = next(again)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert list(stream.plan(2)) != list(stream.plan(1))


def test_process_slices_partition_each_batch(spm_tok):
    cfg = tiny_config("data.bucket_lengths=[16, 32]", "data.max_len=32", "data.batch_tokens=256").data
    examples = data_lib.tokenize_pairs(spm_tok, read_gz("train.en.gz", 300), read_gz("train.de.gz", 300), 32)
    whole = next(data_lib.TrainStream(examples, cfg, seed=0, row_multiple=2))
    halves = [next(data_lib.TrainStream(examples, cfg, seed=0, row_multiple=2, process_index=p, process_count=2))
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["src"] for h in halves]), whole["src"])


def unpack(batch):
    """The (src, tgt) pairs of a packed batch, read back through its segment ids and positions."""
    pairs = []
    for r in range(batch["src"].shape[0]):
        for segment in range(1, batch["src_segments"][r].max() + 1):
            on_src, on_tgt = batch["src_segments"][r] == segment, batch["tgt_segments"][r] == segment
            assert np.ptp(np.flatnonzero(on_src)) == on_src.sum() - 1  # one contiguous run per side
            assert np.ptp(np.flatnonzero(on_tgt)) == on_tgt.sum() - 1
            assert (batch["src_positions"][r][on_src] == np.arange(on_src.sum())).all()
            assert (batch["tgt_positions"][r][on_tgt] == np.arange(on_tgt.sum())).all()
            tgt_in, tgt_out = batch["tgt_in"][r][on_tgt], batch["tgt_out"][r][on_tgt]
            assert tgt_in[0] == tok_lib.BOS_ID and tgt_out[-1] == tok_lib.EOS_ID
            assert (tgt_in[1:] == tgt_out[:-1]).all()  # teacher forcing: input is output shifted
            pairs.append((tuple(batch["src"][r][on_src]), tuple(tgt_out[:-1])))
        padding = batch["src_segments"][r] == 0
        assert (batch["src"][r][padding] == 0).all() and (batch["tgt_out"][r][batch["tgt_segments"][r] == 0] == 0).all()
    return pairs


def test_packed_batches_hold_every_pair_once_and_resume(spm_tok):
    cfg = tiny_config("data.pack_lengths=[64, 128]", "data.bucket_lengths=[64, 128]", "data.max_len=128",
                      "data.batch_tokens=512").data
    src, tgt = read_gz("train.en.gz", 1500), read_gz("train.de.gz", 1500)
    examples = data_lib.tokenize_pairs(spm_tok, src, tgt, cfg.max_len)
    stream = data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4)
    plan = stream.plan(0)
    seen = sorted(i for _, rows in plan for row in rows for i in row)
    assert seen == list(range(len(examples)))  # each pair exactly once
    got, shapes = [], set()
    for _ in range(len(plan)):
        batch = next(stream)
        shapes.add(batch["src"].shape)
        assert all(batch[k].shape == batch["src"].shape for k in batch)
        got += unpack(batch)
    want = [(tuple(s), tuple(t)) for s, t in zip(examples.src, examples.tgt)]
    assert sorted(got) == sorted(want)  # every pair, intact
    assert shapes == {(8, 64), (4, 128)}  # rows = batch_tokens // length, a multiple of 4
    # A pair takes the shortest row length that holds it, or tops up a longer row; rows are
    # filled well.
    filled, short_rows, long_fill, toppers = 0, [], [], 0
    for length, rows in plan:
        for row in rows:
            need = [max(len(examples.src[i]), len(examples.tgt[i]) + 1) for i in row]
            if length == 64:
                assert all(n <= 64 for n in need)
                if row:
                    filled += sum(len(examples.tgt[i]) + 1 for i in row)
                    short_rows.append(len(row))
            elif row:
                long_fill.append(sum(need) / 128)
                toppers += sum(n <= 64 for n in need)
    assert filled / (64 * len(short_rows)) > 0.8 and np.mean(short_rows) > 1.5  # one pair a row: ~0.5, 1
    assert toppers > 0 and np.mean(long_fill) > 0.8, (toppers, np.mean(long_fill))
    # The plan is a pure function of (seed, epoch): a new stream resumes mid-epoch exactly.
    first = [next(stream) for _ in range(3)]
    again = data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4)
    again.set_position({"epoch": 1, "index": 0})
    for a in first:
        b = next(again)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert list(stream.plan(2)) != list(stream.plan(1))
    # Two processes take complementary halves of every batch's rows.
    halves = [next(data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4, process_index=p, process_count=2))
              for p in range(2)]
    whole = next(data_lib.TrainStream(examples, cfg, seed=3, row_multiple=4))
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
    # Validation batches: every pair once, packed longest first.
    valid = data_lib.eval_batches(examples, cfg, row_multiple=4)
    assert sorted(p for b in valid for p in unpack(b)) == sorted(want)


def test_parallel_text_splits_on_newline_only(tmp_path):
    """A bare CR, U+2028 or form feed inside a line must not shift one side against the other."""
    a, b = tmp_path / "a.en", tmp_path / "b.de"
    a.write_bytes("one\rstill one\ntwo\u2028too\r\nthree\x0c\n".encode())
    b.write_bytes(b"eins\nzwei\ndrei\n")
    src, tgt = corpus.read_local([str(a), str(b)], "en", "de")
    assert src == ["one\rstill one", "two\u2028too", "three\x0c"] and tgt == ["eins", "zwei", "drei"]
