"""Epoch plans: which pairs go into which row of which batch, as a pure function of (seed, epoch).

A plan is a few flat numpy arrays (rows as runs of pair indices, batches as runs of rows), built
without a Python loop over pairs, so planning millions of pairs takes about a second and a few
bytes a pair. A recorded data position (epoch, batch index) resumes the exact stream.

Bucketed plans pad each pair into its own row of its bucket's length. Packed plans put several
pairs into each row: first-fit decreasing over pair *classes* (source length, target length)
rather than over pairs: every pair of a class is interchangeable for the packer, so it places
whole classes at once into "cells" of rows with the same room left, in O(lengths^2) steps per
row length whatever the corpus size; which pair of a class lands in which row is then a shuffled
queue. Each pair goes to the shortest row length that holds it, except that the room the longer
rows leave is filled (best fit) with shorter pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Plan:
    """Batches of one epoch. Batch b holds rows batch_start[b]:batch_end[b] (padded with empty rows
    to batch_rows[b]) of length batch_length[b]; row r holds pairs row_pairs[row_ptr[r]:row_ptr[r+1]]."""

    row_pairs: np.ndarray  # int32 [pairs]
    row_ptr: np.ndarray  # int64 [rows + 1]
    batch_start: np.ndarray  # int64 [batches]
    batch_end: np.ndarray  # int64 [batches]
    batch_length: np.ndarray  # int32 [batches]
    batch_rows: np.ndarray  # int32 [batches]: rows with padding, a multiple of the data-parallel size

    def __len__(self) -> int:
        return len(self.batch_start)

    def local_rows(self, b: int, process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """This process's contiguous slice of batch b: (pair indices, their row within the slice, rows)."""
        per = int(self.batch_rows[b]) // process_count
        lo = min(int(self.batch_start[b]) + process_index * per, int(self.batch_end[b]))
        hi = min(lo + per, int(self.batch_end[b]))
        first, last = self.row_ptr[lo], self.row_ptr[hi]
        counts = np.diff(self.row_ptr[lo : hi + 1])
        return self.row_pairs[first:last].astype(np.int64), np.repeat(np.arange(hi - lo), counts), per

    def rows(self, b: int) -> list[tuple[int, ...]]:
        """Batch b's rows as tuples of pair indices, () for a padding row (for tests and tools)."""
        rows = [tuple(self.row_pairs[self.row_ptr[r] : self.row_ptr[r + 1]].tolist())
                for r in range(int(self.batch_start[b]), int(self.batch_end[b]))]
        return rows + [()] * (int(self.batch_rows[b]) - len(rows))

    def __iter__(self):
        """(row length, rows) per batch: the plan as the older list of batches."""
        return ((int(self.batch_length[b]), self.rows(b)) for b in range(len(self)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _assemble(row_pairs: np.ndarray, row_ptr: np.ndarray, row_length: np.ndarray, lengths: Sequence[int],
              batch_tokens: int, row_multiple: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Cuts consecutive rows of each length (rows must come grouped by length, in `lengths` order)
    into batches of batch_tokens // length rows; returns per length (start, end, length, rows)."""
    out = []
    for length in lengths:
        ids = np.flatnonzero(row_length == length)
        if not len(ids):
            continue
        per_batch = max(batch_tokens // length, 1)
        start = np.arange(ids[0], ids[-1] + 1, per_batch, dtype=np.int64)
        end = np.minimum(start + per_batch, ids[-1] + 1)
        out.append((start, end, np.full(len(start), length, np.int32),
                    np.full(len(start), _round_up(per_batch, row_multiple), np.int32)))
    return out


def _finish(row_pairs, row_ptr, row_length, lengths, batch_tokens, row_multiple, rng, shuffle) -> Plan:
    parts = _assemble(row_pairs, row_ptr, row_length, lengths, batch_tokens, row_multiple)
    start, end, length, rows = (np.concatenate([p[i] for p in parts]) for i in range(4))
    if shuffle:
        order = rng.permutation(len(start))
        start, end, length, rows = start[order], end[order], length[order], rows[order]
    return Plan(row_pairs.astype(np.int32), row_ptr, start, end, length, rows)


def bucketed_plan(need: np.ndarray, buckets: Sequence[int], batch_tokens: int, row_multiple: int, seed: int,
                  epoch: int, shuffle: bool = True) -> Plan:
    """One pair a row, padded to the smallest bucket that holds it (`need`: its longer side); pairs
    of a bucket in a random order (unshuffled: shortest first), batches in a random order."""
    rng = np.random.default_rng([seed, epoch])
    buckets = np.asarray(buckets)
    bucket_of = np.searchsorted(buckets, need)  # the smallest bucket >= need
    if len(need) and bucket_of.max() >= len(buckets):
        i = int(np.argmax(bucket_of >= len(buckets)))
        raise ValueError(f"pair {i} ({int(need[i])} tokens) exceeds the largest bucket {int(buckets[-1])}")
    members = []
    for g in range(len(buckets)):
        idx = np.flatnonzero(bucket_of == g)
        if shuffle and len(idx):
            idx = rng.permutation(idx)
        else:
            idx = idx[np.argsort(need[idx], kind="stable")]
        members.append(idx)
    row_pairs = np.concatenate(members) if members else np.zeros(0, np.int64)
    row_length = np.repeat(buckets, [len(m) for m in members]).astype(np.int32)
    row_ptr = np.arange(len(row_pairs) + 1, dtype=np.int64)
    return _finish(row_pairs, row_ptr, row_length, buckets.tolist(), batch_tokens, row_multiple, rng, shuffle)


class _Rooms:
    """Open rows of one length, grouped into cells by the room each side has left."""

    def __init__(self, length: int):
        self.length = length
        self.count = np.zeros((length + 1, length + 1), np.int64)
        self.ids: dict[tuple[int, int], list[np.ndarray]] = {}
        grid = np.arange(length + 1)
        self.cost = grid[:, None] + grid[None, :]  # room left on both sides after a placement

    def push(self, cell: tuple[int, int], rows: np.ndarray) -> None:
        if len(rows):
            self.count[cell] += len(rows)
            self.ids.setdefault(cell, []).append(rows)

    def pop(self, cell: tuple[int, int], n: int) -> np.ndarray:
        out, stack = [], self.ids[cell]
        while n:
            top = stack[-1]
            if len(top) <= n:
                out.append(stack.pop())
                n -= len(top)
            else:
                out.append(top[-n:])
                stack[-1] = top[:-n]
                n = 0
        self.count[cell] -= sum(len(o) for o in out)
        return np.concatenate(out)

    def best_fit(self, s: int, t: int) -> tuple[int, int] | None:
        """The cell whose rows a pair of (s, t) tokens fills best, or None when no open row holds it."""
        fits = self.count[s:, t:] > 0
        if not fits.any():
            return None
        flat = int(np.argmin(np.where(fits, self.cost[: fits.shape[0], : fits.shape[1]], 1 << 30)))
        i, j = divmod(flat, fits.shape[1])
        return i + s, j + t


def packed_plan(src_need: np.ndarray, tgt_need: np.ndarray, pack_lengths: Sequence[int], batch_tokens: int,
                row_multiple: int, seed: int, epoch: int, shuffle: bool = True) -> Plan:
    """Several pairs a row (see the module docstring). src_need/tgt_need: the tokens a pair takes on
    each side of a row (source with EOS, target with BOS or EOS)."""
    rng = np.random.default_rng([seed, epoch])
    n, top = len(src_need), int(pack_lengths[-1])
    s, t = np.asarray(src_need, np.int32), np.asarray(tgt_need, np.int32)
    if n and max(int(s.max()), int(t.max())) > top:
        i = int(np.argmax(np.maximum(s, t) > top))
        raise ValueError(f"pair {i} ({int(s[i])}/{int(t[i])} tokens) does not fit a row of {top}")
    # A class key per pair; 16 bits when it fits, where numpy's stable sort is a linear radix sort.
    key = (s * (top + 1) + t).astype(np.uint16 if (top + 1) ** 2 <= 1 << 16 else np.int32)
    del s, t
    order = (rng.permutation(n) if shuffle else np.arange(n)).astype(np.int32)
    queue = order[np.argsort(key[order], kind="stable")]  # pairs grouped by class, shuffled within
    del order
    count = np.bincount(key, minlength=(top + 1) ** 2)
    del key
    start = np.cumsum(count) - count
    taken = np.zeros_like(count)
    classes = np.flatnonzero(count)
    cs, ct = classes // (top + 1), classes % (top + 1)
    need = np.maximum(cs, ct)
    classes = classes[np.lexsort((-(cs + ct), -need))]  # longest first, then the most tokens
    pair_row = np.empty(n, np.int32)
    row_length: list[np.ndarray] = []
    next_row = 0

    def assign(c: int, rows: np.ndarray) -> None:
        lo = start[c] + taken[c]
        pair_row[queue[lo : lo + len(rows)]] = rows
        taken[c] += len(rows)

    for g in range(len(pack_lengths) - 1, -1, -1):
        length, shorter = int(pack_lengths[g]), int(pack_lengths[g - 1]) if g else 0
        rooms = _Rooms(length)
        for c in classes:
            a, b = divmod(int(c), top + 1)
            if max(a, b) > length:
                continue
            left = int(count[c] - taken[c])
            while left:
                cell = rooms.best_fit(a, b)
                if cell is None:
                    break
                rows = rooms.pop(cell, min(left, int(rooms.count[cell])))
                assign(c, rows)
                rooms.push((cell[0] - a, cell[1] - b), rows)
                left -= len(rows)
            if left and max(a, b) > shorter:  # pairs of this length open rows; shorter ones only fill
                per_row = min(length // a, length // b)
                full, rest = divmod(left, per_row)
                ids = np.arange(next_row, next_row + full + (rest > 0), dtype=np.int64)
                next_row += len(ids)
                row_length.append(np.full(len(ids), length, np.int32))
                assign(c, np.concatenate([np.repeat(ids[:full], per_row), np.repeat(ids[full:], rest)]))
                rooms.push((length - per_row * a, length - per_row * b), ids[:full])
                rooms.push((length - rest * a, length - rest * b), ids[full:])
    assert (taken == count).all()
    row_len = np.concatenate(row_length) if row_length else np.zeros(0, np.int32)
    # Number the rows grouped by length (as pack_lengths lists them), shuffled within a length.
    groups = [np.flatnonzero(row_len == length) for length in pack_lengths]
    final = np.concatenate([rng.permutation(g) if shuffle else g for g in groups])
    renumber = np.empty(len(final), np.int32)
    renumber[final] = np.arange(len(final))
    pair_row = renumber[pair_row]
    row_pairs = np.argsort(pair_row, kind="stable").astype(np.int32)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(pair_row, minlength=len(final)))]).astype(np.int64)
    return _finish(row_pairs, row_ptr, row_len[final], list(pack_lengths), batch_tokens, row_multiple, rng, shuffle)


def padding_share(plan: Plan, src_need: np.ndarray, tgt_need: np.ndarray) -> float:
    """Share of the plan's token slots (both sides, padding rows included) that hold no token."""
    slots = float(np.sum(plan.batch_rows.astype(np.int64) * plan.batch_length) * 2)
    return 1.0 - float(src_need.sum() + tgt_need.sum()) / slots
