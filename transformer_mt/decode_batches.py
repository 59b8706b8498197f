"""Batch planning for decoding: which length-sorted sentences go together, in what padded shape.

Sources are padded to the buckets of training and batches take a row count from a short
ladder (`row_bucket`), so jit compiles a bounded number of search programs whatever the input.
"""

from __future__ import annotations

from typing import Callable, Sequence

from transformer_mt.data import bucket_for


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
                 row_multiple: int = 1, rows_for: Callable[[int], int] = row_bucket
                 ) -> list[tuple[int, int, list[int]]]:
    """Splits length-sorted sentences (each within the largest bucket, as `Translator._fit` cuts
    them) into (source length, rows, positions in `lengths`) batches.

    A batch takes the next sentences while their padded source tokens (count x the bucket of its
    longest) stay within batch_tokens. Its rows are the sentence count rounded up by `row_bucket`
    (and to a multiple of the data-parallel size), so a small input is not decoded at the size of
    a full batch, at most a third of a batch is padding, and the compiled shapes stay few: a
    file's full batches of one bucket share a shape. rows_for replaces `row_bucket` (the server
    pads to powers of two, so its shapes are a small set it compiles at start).
    """
    batches, start = [], 0
    while start < len(lengths):
        end, length = start + 1, bucket_for(lengths[start], buckets)
        while end < len(lengths):
            longer = bucket_for(lengths[end], buckets)
            if (end + 1 - start) * longer > batch_tokens:
                break
            end, length = end + 1, longer
        rows = rows_for(end - start)
        rows = -(-rows // row_multiple) * row_multiple
        batches.append((length, rows, list(range(start, end))))
        start = end
    return batches
