"""Batch planning for decoding: which length-sorted sentences go together, in what padded shape.

Sources are padded to a doubling ladder of training's buckets (`decoding_buckets`, one bucket a
batch) and batches take a row count from a short ladder (`row_bucket`), so jit compiles a bounded
number of search programs whatever the input, and a sentence's translation does not depend on
what else is in its batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

from transformer_mt.data import bucket_for


MIN_ROWS_PER_DEVICE = 2
MIN_DECODING_BUCKET = 16  # source tokens: shorter sentences are padded this far


def decoding_buckets(train_buckets: Sequence[int]) -> tuple[int, ...]:
    """The source lengths decoding pads to: training's buckets thinned to a doubling ladder from
    MIN_DECODING_BUCKET, ending at the largest (8, 12, 16, ..., 64 -> 16, 32, 64). A sentence is
    padded to training's own bucket or to at most twice its length.

    Each padded length is a search program of its own, and in a new process each program's first
    run costs ~0.25 s besides its load (XLA:CPU sets up its YNN kernels then): a file of 10,000
    lines met 14 programs on training's ten buckets, 5 on this ladder, and was translated ~8%
    faster (benchmarks/RESULTS.md, 2026-12-03, third sitting). The extra padding costs the encoder
    and the cross-attention little beside the decoder's steps. Still a function of the sentence
    alone, so a sentence's padded shape never depends on its neighbours."""
    ladder = sorted(train_buckets)
    kept = [next(b for b in ladder if b >= min(MIN_DECODING_BUCKET, ladder[-1]))]
    while kept[-1] < ladder[-1]:
        within = [b for b in ladder if kept[-1] < b <= 2 * kept[-1]]  # the longest at most twice as long,
        kept.append(within[-1] if within else next(b for b in ladder if b > kept[-1]))  # else training's next
    return tuple(kept)


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_bucket(n: int) -> int:
    """Rows for n sentences: up to 16, the next of 1, 2, 3, 4, 6, 8, 12, 16; above, the next
    multiple of 8. At most a third of a batch is padding, and at most 7 rows of it in a large
    batch (the coarser 24, 32, 48, 64, ... ladder wasted up to a third of the work of a file's
    last, partial batch). A file's full batches share one row count, so the programs stay few."""
    if n > 16:
        return -(-n // 8) * 8
    p = next_power_of_two(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], batch_tokens: int,
                 row_multiple: int = 1, rows_for: Callable[[int], int] = row_bucket, one_bucket: bool = True
                 ) -> list[tuple[int, int, list[int]]]:
    """Splits length-sorted sentences (each within the largest bucket, as `Translator._fit` cuts
    them) into (source length, rows, positions in `lengths`) batches.

    A batch holds sentences of one length bucket only, as many as fit batch_tokens padded source
    tokens. So a sentence's padded shape (its bucket, and the search's step limit and cache that
    follow from it) is a function of the sentence alone, never of its neighbours: its sums run over
    the same padded lengths in a file, in a pipe and in a server's batch, and a near-tie between two
    words cannot be decided differently (padding the same sentence to 20 or to 24 tokens moves its
    bf16 scores in the third decimal). Rows: the sentence count rounded up by `rows_for`
    (`row_bucket` by default; the server pads to powers of two, a small set compiled at start),
    to a multiple of the data-parallel size, and at least 2 rows a device (a 1-row product runs
    another kernel on CPU, and its last bits differ).

    one_bucket=False lets a batch run on into longer buckets while its padded tokens fit, padded
    to the longest: the server's choice, where a batching cycle holds a few lines of many lengths
    and one search loop over them all costs a third of one loop a bucket (decoding steps are
    overhead-bound at a few rows). A sentence's padding then depends on its neighbours; in
    float32 that moved no translation of test_2016, in bf16 about 1 line in 1,000 (as row counts
    do: XLA picks its dot kernels by shape).
    """
    batches, start = [], 0
    while start < len(lengths):
        end, length = start + 1, bucket_for(lengths[start], buckets)
        while end < len(lengths):
            longer = bucket_for(lengths[end], buckets)
            if (longer != length and one_bucket) or (end + 1 - start) * longer > batch_tokens:
                break
            end, length = end + 1, longer
        rows = max(rows_for(end - start), MIN_ROWS_PER_DEVICE * row_multiple)
        rows = -(-rows // row_multiple) * row_multiple
        batches.append((length, rows, list(range(start, end))))
        start = end
    return batches
