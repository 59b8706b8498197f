"""`translate --alignment`: word alignments read off the model's cross-attention.

For each target word, the source word it attends to most, in the last decoder layer's
cross-attention averaged over heads: a source word's pieces add up (it is attended to through
any of them), a target word's pieces average (each of its steps has its own view). Words are the
whitespace-separated words of the cleaned input line and of the output line, numbered from 0;
a SentencePiece piece starting with ▁ begins a word. Pairs are written `i-j` (source word i,
target word j), as Pharaoh / fairseq print them, in target order.

The weights come from one teacher-forcing pass over (source, translation) after decoding, the
translation tokenized again from its text (search.Translator.attention_weights).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from transformer_mt.textio import clean_line
from transformer_mt.tokenizer import EOS_ID

SEPARATOR = " ||| "


def piece_words(pieces: Sequence[str]) -> list[int]:
    """The word each SentencePiece piece belongs to, numbered as str.split() numbers the words of
    the detokenized text: ▁ (or a space) ends a word and the next visible character starts one.
    A piece with no visible character (a lone ▁ before punctuation) belongs to the word after
    it; -1 where none follows."""
    words, word, in_word = [], -1, False
    for piece in pieces:
        first = None
        for ch in piece:
            if ch == "▁" or ch.isspace():
                in_word = False
                continue
            if not in_word:
                word, in_word = word + 1, True
            if first is None:
                first = word
        words.append(word + 1 if first is None else first)
    return [w if w <= word else -1 for w in words]


def word_alignment(weights: np.ndarray, src_words: Sequence[int], tgt_words: Sequence[int]) -> list[tuple[int, int]]:
    """(source word, target word) pairs, one per target word, from piece weights [T', S'] whose
    first len(tgt_words) rows and len(src_words) columns are the pieces' (the EOS row and
    column after them, and pieces of word -1, are left out)."""
    src_words, tgt_words = np.asarray(src_words), np.asarray(tgt_words)
    n_src, n_tgt = int(src_words.max(initial=-1)) + 1, int(tgt_words.max(initial=-1)) + 1
    if not n_src or not n_tgt:
        return []
    w = np.asarray(weights, np.float64)[: len(tgt_words), : len(src_words)]  # [T, S] pieces
    per_src_word = w @ (src_words[:, None] == np.arange(n_src))  # [T, words]: sum over a word's pieces
    members = (tgt_words[:, None] == np.arange(n_tgt)).astype(np.float64)  # [T, target words]
    counts = members.sum(axis=0)
    per_word = members.T @ per_src_word / np.maximum(counts, 1)[:, None]  # mean over a word's pieces
    best = per_word.argmax(axis=1)
    return [(int(best[j]), j) for j in range(n_tgt) if counts[j]]


def _pieces(sp, texts: Sequence[str], ids: Sequence[Sequence[int]]) -> list[list[str]]:
    """Each text's pieces as strings (an unknown character keeps its own text, not <unk>)."""
    out = []
    for p, i in zip(sp.encode(list(texts), out_type=str), ids):
        out.append(p if len(p) == len(i) else [sp.id_to_piece(int(x)) for x in i])
    return out


def align_texts(translator, params, sources: Sequence[str], targets: Sequence[str]) -> list[str]:
    """'i-j i-j ...' for each (cleaned source, target) text pair; '' when either has no words.
    translator: a search.Translator."""
    tok = translator.tok
    src_ids = [ids[:-1] for ids in tok.encode_src(sources)]  # without EOS
    tgt_ids = tok.encode_tgt(targets)
    src_pieces, tgt_pieces = _pieces(tok.src, sources, src_ids), _pieces(tok.tgt, targets, tgt_ids)
    todo = [k for k in range(len(sources)) if src_ids[k] and tgt_ids[k]]
    weights = translator.attention_weights(params, [src_ids[k] + [EOS_ID] for k in todo], [tgt_ids[k] for k in todo],
                                           alignment_only=True)
    out = [""] * len(sources)
    for k, w in zip(todo, weights):
        pairs = word_alignment(w, piece_words(src_pieces[k]), piece_words(tgt_pieces[k]))
        # Piece words and text words differ only where normalisation splits a character; never
        # name a word the line does not have.
        n_src, n_tgt = len(sources[k].split()), len(targets[k].split())
        out[k] = " ".join(f"{i}-{j}" for i, j in pairs if i < n_src and j < n_tgt)
    return out


def align_hypotheses(translator, params, lines: Sequence[str], results: Sequence[Sequence[tuple[str, float]]]
                     ) -> list[list[str]]:
    """An alignment per hypothesis of Translator.translate_lines' n-best `results` for input `lines`."""
    pairs = [(k, h) for k, hyps in enumerate(results) for h in range(len(hyps))]
    sources = [clean_line(lines[k]) for k, _ in pairs]
    aligned = align_texts(translator, params, sources, [results[k][h][0] for k, h in pairs])
    out: list[list[str]] = [[] for _ in results]
    for (k, _), a in zip(pairs, aligned):
        out[k].append(a)
    return out
