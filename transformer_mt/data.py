"""Token ids -> length-bucketed or packed, padded numpy batches (corpus.py reads the text).

Every batch has one of a few fixed shapes, so jit compiles a bounded number of programs:
bucketed, a batch is padded to its bucket length (rows, bucket_length); packed
(data.pack_lengths), several pairs share each row (rows, pack length), told apart by segment
ids. The batch order of an epoch is a pure function of (seed, epoch), so a data position
(epoch, batch index) recorded in a checkpoint resumes the exact stream.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from transformer_mt import plans
from transformer_mt.config import ConfigError, DataConfig
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# ----------------------------------------------------------------------------- tokenized pairs


class ArraySide:
    """One side's pairs as a flat token array and per-pair offsets, in memory."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens, self.offsets = tokens, offsets

    def gather(self, pairs: np.ndarray, n: np.ndarray) -> np.ndarray:
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return np.asarray(self.tokens[np.repeat(self.offsets[pairs], n) + within], np.int32)


class FileSide:
    """One side's pairs read from a token store's files with positioned reads, a few per pair.

    Not a memory map: random pairs from a map fault in whole neighbourhoods of pages (64 KiB
    each here), so the map's resident share grows to the whole corpus within an epoch's first
    hundred batches; reads keep this process's memory flat whatever the corpus size.
    """

    def __init__(self, ids_path: Path, offsets_path: Path, dtype: str):
        self.dtype = np.dtype(dtype)
        self.ids = os.open(ids_path, os.O_RDONLY)
        self.offsets = os.open(offsets_path, os.O_RDONLY)

    def gather(self, pairs: np.ndarray, n: np.ndarray) -> np.ndarray:
        size = self.dtype.itemsize
        starts = [int.from_bytes(os.pread(self.offsets, 8, 8 * int(i)), "little") for i in pairs]
        data = b"".join(os.pread(self.ids, int(k) * size, start * size) for start, k in zip(starts, n))
        return np.frombuffer(data, self.dtype).astype(np.int32)

    def __del__(self):
        for fd in (getattr(self, "ids", None), getattr(self, "offsets", None)):
            if fd is not None:
                os.close(fd)


class _Sequences:
    """One side as a read-only list of int32 arrays (for tests and tools; batches use gather)."""

    def __init__(self, examples: "Examples", side: str):
        self.examples, self.side = examples, side

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.examples.gather(self.side, np.array([i]))[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Examples:
    """Tokenized pairs: each side's per-pair lengths in RAM (2-8 bytes a pair) and its tokens in
    memory (small data) or in a token store's files (store.py), read batch by batch, so a corpus
    of any size costs a few bytes a pair. Source ids end with EOS; target ids carry neither BOS
    nor EOS."""

    def __init__(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]):
        """From per-pair id lists (small data: validation, scoring, tests)."""
        sides = []
        for seqs in (src, tgt):
            n = np.fromiter((len(x) for x in seqs), np.int64, count=len(seqs))
            flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int32, count=int(n.sum()))
            sides.append((ArraySide(flat, np.concatenate([[0], np.cumsum(n)])), n))
        self.__init_sides(*sides[0], *sides[1])

    @classmethod
    def from_sides(cls, src, src_len: np.ndarray, tgt, tgt_len: np.ndarray) -> "Examples":
        """From readers with a gather(pairs, lengths) method (ArraySide, FileSide) and lengths."""
        self = cls.__new__(cls)
        self.__init_sides(src, src_len, tgt, tgt_len)
        return self

    def __init_sides(self, src, src_len, tgt, tgt_len) -> None:
        self.readers = {"src": src, "tgt": tgt}
        self.src_len, self.tgt_len = src_len, tgt_len
        self.src, self.tgt = _Sequences(self, "src"), _Sequences(self, "tgt")

    def __len__(self) -> int:
        return len(self.src_len)

    def lengths(self) -> np.ndarray:
        """Padded length each pair needs: source with EOS, target with BOS (input) / EOS (output)."""
        return np.maximum(*self.side_lengths())

    def side_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens each pair takes in a row: (source with EOS, target with BOS / EOS)."""
        return self.src_len.astype(np.int32), self.tgt_len.astype(np.int32) + 1

    def gather(self, side: str, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of `pairs` one after another (int32), and each pair's length."""
        n = (self.src_len if side == "src" else self.tgt_len)[pairs].astype(np.int64)
        return self.readers[side].gather(np.asarray(pairs, np.int64), n), n


def keep_mask(src_len: np.ndarray, tgt_len: np.ndarray, max_len: int | None) -> np.ndarray:
    """Pairs training keeps: both sides non-empty and, when max_len is set, neither side longer
    than it (source with EOS, target with BOS/EOS)."""
    keep = (src_len > 1) & (tgt_len > 0)
    if max_len is not None:
        keep &= np.maximum(src_len, tgt_len + 1) <= max_len
    return keep


def tokenize_pairs(tok: Tokenizer, src: Sequence[str], tgt: Sequence[str], max_len: int | None) -> Examples:
    """Encodes pairs in memory (small data); drops empty pairs and, with max_len, longer ones."""
    src_ids, tgt_ids = tok.encode_src(src), tok.encode_tgt(tgt)
    keep = keep_mask(np.array([len(s) for s in src_ids]), np.array([len(t) for t in tgt_ids]), max_len)
    return Examples([s for s, k in zip(src_ids, keep) if k], [t for t, k in zip(tgt_ids, keep) if k])


# ----------------------------------------------------------------------------- batch arrays


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds largest bucket {buckets[-1]}")


def examples_per_batch(bucket_len: int, batch_tokens: int) -> int:
    """Real examples in a batch of this bucket: about batch_tokens padded tokens.

    It does not depend on the device count, so the global batches (and so the training run)
    are the same on 1 or 64 devices.
    """
    return max(batch_tokens // bucket_len, 1)


def rows_for_bucket(bucket_len: int, batch_tokens: int, row_multiple: int) -> int:
    """Batch rows: examples_per_batch rounded up to a multiple of the data-parallel size.

    The extra rows are all padding and add nothing to losses or gradients.
    """
    n = examples_per_batch(bucket_len, batch_tokens)
    return -(-n // row_multiple) * row_multiple


PACKED_KEYS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


def build_batch(examples: Examples, pairs: np.ndarray, row_of_pair: np.ndarray, rows: int, length: int,
                packed: bool) -> dict[str, np.ndarray]:
    """{src, tgt_in, tgt_out} int32 [rows, length] with `pairs` laid out one after another in their
    rows (row_of_pair, non-decreasing); packed adds PACKED_KEYS: per token its pair's segment id
    (1, 2, ... within the row; 0 is padding) and its position within the pair. No loop over pairs."""
    keys = ("src", "tgt_in", "tgt_out") + (PACKED_KEYS if packed else ())
    out = {k: np.full((rows, length), PAD_ID, np.int32) for k in keys}
    if not len(pairs):
        return out
    per_row = np.bincount(row_of_pair, minlength=rows)
    first_of_row = np.cumsum(per_row) - per_row
    segment = np.arange(len(pairs)) - first_of_row[row_of_pair] + 1
    for side, extra in (("src", 0), ("tgt", 1)):
        tokens, n = examples.gather(side, pairs)
        span = n + extra  # a target takes one more slot: BOS in the input, EOS in the output
        end = np.cumsum(span)
        start = end - span
        col0 = start - start[first_of_row[row_of_pair]]  # where each pair starts in its row
        row_t = np.repeat(row_of_pair, n)
        within = np.arange(len(tokens)) - np.repeat(np.cumsum(n) - n, n)
        col_t = np.repeat(col0, n) + within
        if side == "src":
            out["src"][row_t, col_t] = tokens
        else:
            out["tgt_in"][row_t, col_t + 1] = tokens
            out["tgt_out"][row_t, col_t] = tokens
            out["tgt_in"][row_of_pair, col0] = BOS_ID
            out["tgt_out"][row_of_pair, col0 + n] = EOS_ID
        if packed:
            row_s = np.repeat(row_of_pair, span)
            pos = np.arange(int(span.sum())) - np.repeat(start, span)
            col_s = np.repeat(col0, span) + pos
            out[f"{side}_segments"][row_s, col_s] = np.repeat(segment, span)
            out[f"{side}_positions"][row_s, col_s] = pos
    return out


def pad_batch(examples: Examples, indices: np.ndarray, rows: int, length: int) -> dict[str, np.ndarray]:
    """Builds {src, tgt_in, tgt_out} int32 [rows, length], one pair a row; index -1 gives an all-pad row."""
    indices = np.asarray(indices, np.int64)
    real = np.flatnonzero(indices >= 0)
    return build_batch(examples, indices[real], real, rows, length, packed=False)


def pack_batch(examples: Examples, rows: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
    """Builds a packed batch whose row r holds the pairs rows[r] (() is an empty row)."""
    pairs = np.array([i for row in rows for i in row], np.int64)
    row_of_pair = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    return build_batch(examples, pairs, row_of_pair, len(rows), length, packed=True)


# ----------------------------------------------------------------------------- epoch streams


def plan_epoch(examples: Examples, cfg: DataConfig, row_multiple: int, seed: int, epoch: int,
               shuffle: bool = True) -> plans.Plan:
    """The batches of one epoch, packed or bucketed as cfg says."""
    src_need, tgt_need = examples.side_lengths()
    if cfg.pack_lengths:
        return plans.packed_plan(src_need, tgt_need, cfg.pack_lengths, cfg.batch_tokens, row_multiple, seed, epoch,
                                 shuffle)
    return plans.bucketed_plan(np.maximum(src_need, tgt_need), cfg.bucket_lengths, cfg.batch_tokens, row_multiple,
                               seed, epoch, shuffle)


def local_batch(examples: Examples, cfg: DataConfig, plan: plans.Plan, b: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's contiguous slice of batch b's rows, as arrays (reading only its own pairs)."""
    pairs, row_of_pair, rows = plan.local_rows(b, process_index, process_count)
    return build_batch(examples, pairs, row_of_pair, rows, int(plan.batch_length[b]), bool(cfg.pack_lengths))


def _return_freed_memory() -> None:
    """Hands the heap that planning freed back to the OS (glibc keeps it otherwise: ~40 bytes a
    pair of a plan's temporaries would stay resident for the whole run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TrainStream:
    """Endless stream of global training batches with a resumable position.

    `position` is (epoch, index of the next batch in that epoch's plan): resuming costs one epoch
    plan, never a replay. On several hosts each process takes its own contiguous slice of every
    global batch's rows.
    """

    def __init__(self, examples: Examples, cfg: DataConfig, seed: int, row_multiple: int = 1,
                 process_index: int = 0, process_count: int = 1):
        if not len(examples):
            raise ConfigError("no training pairs left after length filtering (check data.max_len)")
        self.examples, self.cfg, self.seed = examples, cfg, seed
        self.row_multiple = row_multiple
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.index = 0, 0
        self._plan_epoch, self._plan = -1, None

    def plan(self, epoch: int) -> plans.Plan:
        if epoch != self._plan_epoch:
            self._plan = None
            self._plan = plan_epoch(self.examples, self.cfg, self.row_multiple, self.seed, epoch)
            self._plan_epoch = epoch
            _return_freed_memory()
        return self._plan

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_position(self, position: dict) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self.plan(self.epoch)
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        b = self.index
        self.index += 1
        return local_batch(self.examples, self.cfg, plan, b, self.process_index, self.process_count)


def eval_batches(examples: Examples, cfg: DataConfig, row_multiple: int = 1, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every example once, sorted by length, in the training batches' shapes (validation loss)."""
    plan = plan_epoch(examples, cfg, row_multiple, 0, 0, shuffle=False)
    return [local_batch(examples, cfg, plan, b, process_index, process_count) for b in range(len(plan))]
