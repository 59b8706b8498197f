"""Parallel text -> token ids -> length-bucketed or packed, padded numpy batches.

Every batch has one of a few fixed shapes, so jit compiles a bounded number of programs:
bucketed, a batch is padded to its bucket length (rows, bucket_length); packed
(data.pack_lengths), several pairs share each row (rows, pack length), told apart by segment
ids. The batch order of an epoch is a pure function of (seed, epoch), so a data position
(epoch, batch index) recorded in a checkpoint resumes the exact stream.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from transformer_mt.config import ConfigError, DataConfig
from transformer_mt.textio import read_lines
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


# ----------------------------------------------------------------------------- reading text


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    return path


def _load_local(kind: str, path: Path, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types; the user needs the file name
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot read {path}: {msg}") from None


def _column(records, name: str) -> list:
    """A whole column as Python objects, straight from Arrow (row-by-row access is ~500x slower)."""
    return records.with_format("arrow")[name].to_pylist()


def _read_text_pair(src_path: Path, tgt_path: Path) -> tuple[list[str], list[str]]:
    # Our own reader, not datasets' "text" builder: that one also ends lines at a bare '\r',
    # which silently shifts one side of a parallel corpus against the other.
    src, tgt = read_lines(str(src_path)), read_lines(str(tgt_path))
    if len(src) != len(tgt):
        raise ConfigError(f"parallel files differ in length: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}")
    return src, tgt


def _read_tsv(path: Path) -> tuple[list[str], list[str]]:
    import datasets

    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    ds = _load_local(
        "csv", path, delimiter="\t", column_names=["src", "tgt"], quoting=csv.QUOTE_NONE,
        keep_default_na=False, na_filter=False, features=features,
    )
    return [s or "" for s in _column(ds, "src")], [t or "" for t in _column(ds, "tgt")]


def _translation_columns(records, where: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Reads {"translation": {src: .., tgt: ..}} records (wmt14, iwslt2017) or flat {src:, tgt:} ones."""
    names = records.column_names
    if "translation" in names:
        pairs = _column(records, "translation")
        try:
            return [p[src_lang] for p in pairs], [p[tgt_lang] for p in pairs]
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: translation records lack languages '{src_lang}'/'{tgt_lang}'") from None
    if src_lang in names and tgt_lang in names:
        return _column(records, src_lang), _column(records, tgt_lang)
    raise ConfigError(f"{where}: expected a 'translation' column or columns '{src_lang}' and '{tgt_lang}', found {names}")


def _read_jsonl(path: Path, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    return _translation_columns(_load_local("json", path), str(path), src_lang, tgt_lang)


def read_local(files: Sequence[str], src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Two files: parallel plain text; one file: .tsv or .jsonl (optionally .gz)."""
    paths = [_require_file(f) for f in files]
    if len(paths) == 2:
        return _read_text_pair(*paths)
    if len(paths) == 1:
        name = paths[0].name.removesuffix(".gz")
        if name.endswith(".tsv"):
            return _read_tsv(paths[0])
        if name.endswith((".jsonl", ".json")):
            return _read_jsonl(paths[0], src_lang, tgt_lang)
        raise ConfigError(f"{paths[0]}: a single data file must be .tsv or .jsonl; give two files for parallel text")
    raise ConfigError(f"expected one (.tsv/.jsonl) or two (parallel text) data files, got {len(paths)}")


def read_hub(name: str, config_name: str, split: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """A Hugging Face hub translation dataset (e.g. wmt14 de-en); needs the network or a local cache."""
    import datasets

    try:
        records = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load hub dataset {name}/{config_name} split {split}: {msg}") from None
    return _translation_columns(records, f"{name}/{split}", src_lang, tgt_lang)


def load_split(cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    """(source, target) sentences of split 'train', 'valid' or 'test'."""
    files = {"train": cfg.train_files, "valid": cfg.valid_files, "test": cfg.test_files}[split]
    if files:
        src, tgt = read_local(files, cfg.src_lang, cfg.tgt_lang)
    elif cfg.dataset:
        hub_split = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}[split]
        src, tgt = read_hub(cfg.dataset, cfg.dataset_config, hub_split, cfg.src_lang, cfg.tgt_lang)
    else:
        return [], []
    if split == "train" and cfg.max_train_examples:
        src, tgt = src[: cfg.max_train_examples], tgt[: cfg.max_train_examples]
    return src, tgt


# ----------------------------------------------------------------------------- tokenized examples


@dataclass
class Examples:
    """Tokenized pairs: src ids end with EOS; tgt ids carry neither BOS nor EOS."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> np.ndarray:
        """Padded length each pair needs: source with EOS, target with BOS (input) / EOS (output)."""
        return np.maximum(*self.side_lengths())

    def side_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens each pair takes in a row: (source with EOS, target with BOS / EOS)."""
        return (np.array([len(s) for s in self.src], dtype=np.int64),
                np.array([len(t) + 1 for t in self.tgt], dtype=np.int64))


def tokenize_pairs(tok: Tokenizer, src: Sequence[str], tgt: Sequence[str], max_len: int | None) -> Examples:
    """Encodes pairs; drops empty pairs and, when max_len is set, pairs longer than it."""
    src_ids = tok.encode_src(src)
    tgt_ids = tok.encode_tgt(tgt)
    keep_src, keep_tgt = [], []
    for s, t in zip(src_ids, tgt_ids):
        if len(s) <= 1 or not t:
            continue
        if max_len is not None and max(len(s), len(t) + 1) > max_len:
            continue
        keep_src.append(np.asarray(s, np.int32))
        keep_tgt.append(np.asarray(t, np.int32))
    return Examples(keep_src, keep_tgt)


# ----------------------------------------------------------------------------- bucketing


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


def pad_batch(examples: Examples, indices: np.ndarray, rows: int, length: int) -> dict[str, np.ndarray]:
    """Builds {src, tgt_in, tgt_out} int32 [rows, length]; index -1 gives an all-pad row."""
    src = np.full((rows, length), PAD_ID, np.int32)
    tgt_in = np.full((rows, length), PAD_ID, np.int32)
    tgt_out = np.full((rows, length), PAD_ID, np.int32)
    for r, i in enumerate(indices):
        if i < 0:
            continue
        s, t = examples.src[i], examples.tgt[i]
        src[r, : len(s)] = s
        tgt_in[r, 0] = BOS_ID
        tgt_in[r, 1 : len(t) + 1] = t
        tgt_out[r, : len(t)] = t
        tgt_out[r, len(t)] = EOS_ID
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def epoch_plan(lengths: np.ndarray, buckets: Sequence[int], batch_tokens: int, row_multiple: int,
               seed: int, epoch: int, shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
    """The batches of one epoch as (bucket_length, example indices padded with -1 to the row count).

    A pure function of (seed, epoch): a recorded (epoch, index) resumes the same stream.
    """
    rng = np.random.default_rng([seed, epoch])
    bucket_of = np.array([bucket_for(int(n), buckets) for n in lengths], dtype=np.int64)
    plan = []
    for b in buckets:
        idx = np.flatnonzero(bucket_of == b)
        if not len(idx):
            continue
        if shuffle:
            idx = rng.permutation(idx)
        else:
            idx = idx[np.argsort(lengths[idx], kind="stable")]
        per_batch = examples_per_batch(b, batch_tokens)
        rows = rows_for_bucket(b, batch_tokens, row_multiple)
        for start in range(0, len(idx), per_batch):
            chunk = idx[start : start + per_batch]
            plan.append((b, np.pad(chunk, (0, rows - len(chunk)), constant_values=-1)))
    if shuffle:
        order = rng.permutation(len(plan))
        plan = [plan[i] for i in order]
    return plan


# ----------------------------------------------------------------------------- packing

PACK_POOL = 64  # rows open at once while packing: more fill tighter, at more work per pair
PACKED_KEYS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


def pack_rows(src_len: np.ndarray, tgt_len: np.ndarray, order: Sequence[int], length: int,
              pool: int = PACK_POOL) -> list[tuple[int, ...]]:
    """Example indices per row of `length` tokens a side, taking the pairs in `order`.

    A pair joins the open row it leaves least room in (best fit, both sides counted). When no
    open row has room for it, the fullest of the `pool` open rows is closed and a new row takes
    the pair. Rows come out in the order they close, so a shuffled `order` gives shuffled rows.
    """
    free_src = np.full(pool, -1, np.int64)  # -1: a slot with no row open in it yet
    free_tgt = np.full(pool, -1, np.int64)
    members: list[list[int]] = [[] for _ in range(pool)]
    rows: list[tuple[int, ...]] = []
    for i in order:
        s, t = int(src_len[i]), int(tgt_len[i])
        if s > length or t > length:
            raise ValueError(f"pair {i} ({s}/{t} tokens) does not fit a row of {length}")
        fits = (free_src >= s) & (free_tgt >= t)
        if fits.any():
            j = int(np.argmin(np.where(fits, free_src + free_tgt, 4 * length)))
        else:  # an empty slot if any (free -1 each side), else the fullest row, which closes
            j = int(np.argmin(free_src + free_tgt))
            if members[j]:
                rows.append(tuple(members[j]))
            members[j], free_src[j], free_tgt[j] = [], length, length
        members[j].append(int(i))
        free_src[j] -= s
        free_tgt[j] -= t
    rows.extend(tuple(m) for m in members if m)
    return rows


def packed_plan(examples: Examples, pack_lengths: Sequence[int], batch_tokens: int, row_multiple: int, seed: int,
                epoch: int, shuffle: bool = True) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The packed batches of one epoch as (row length, rows of example indices; () is an empty row).

    Each pair goes to the shortest of pack_lengths that holds it, except that the room its longer
    rows leave (a pair of 40 tokens in a row of 64) is topped up with shorter pairs. A batch of
    length L has batch_tokens // L rows, rounded up to a multiple of the data-parallel size with
    empty rows (so the count itself does not depend on the device count). A pure function of
    (seed, epoch), like epoch_plan. Unshuffled, pairs are packed longest first, which fills rows
    tightest.
    """
    src_len, tgt_len = examples.side_lengths()
    need = np.maximum(src_len, tgt_len)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples)) if shuffle else np.argsort(-need, kind="stable")
    group = np.searchsorted(np.asarray(pack_lengths), need[order])  # the shortest length that holds each
    members = [order[group == g] for g in range(len(pack_lengths))]
    packed = {}
    for g in range(len(pack_lengths) - 1, 0, -1):  # longest rows first, then top them up
        length = pack_lengths[g]
        rows = pack_rows(src_len, tgt_len, members[g], length, pool=len(members[g]) + 1)
        room = sum(length - max(src_len[list(r)].sum(), tgt_len[list(r)].sum()) for r in rows)
        shorter = np.concatenate(members[:g])  # in the epoch's order, group by group
        take = int(np.searchsorted(np.cumsum(need[shorter]), 0.9 * room, side="right"))
        if take:
            fillers = shorter[:take]
            members[:g] = [m[~np.isin(m, fillers)] for m in members[:g]]
            # Every row stays open (pool), so each filler goes to the row it fits best.
            rows = pack_rows(src_len, tgt_len, np.concatenate([members[g], fillers]), length, pool=len(rows) + 1)
        packed[g] = rows
    packed[0] = pack_rows(src_len, tgt_len, members[0], pack_lengths[0])
    plan = []
    for g, length in enumerate(pack_lengths):
        rows = packed[g]
        per_batch = max(batch_tokens // length, 1)
        n_rows = -(-per_batch // row_multiple) * row_multiple
        plan += [(length, rows[k : k + per_batch] + [()] * (n_rows - len(rows[k : k + per_batch])))
                 for k in range(0, len(rows), per_batch)]
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def pack_batch(examples: Examples, rows: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
    """Builds {src, tgt_in, tgt_out} int32 [rows, length] holding each row's pairs one after
    another, and PACKED_KEYS: per token its pair's segment id (1, 2, ... within the row; 0 is
    padding) and its position within the pair. Attention stays within a segment (model.py)."""
    n = len(rows)
    out = {k: np.full((n, length), PAD_ID, np.int32) for k in ("src", "tgt_in", "tgt_out")}
    out.update({k: np.zeros((n, length), np.int32) for k in PACKED_KEYS})
    for r, row in enumerate(rows):
        at_src = at_tgt = 0
        for segment, i in enumerate(row, start=1):
            s, t = examples.src[i], examples.tgt[i]
            end_src, end_tgt = at_src + len(s), at_tgt + len(t) + 1
            out["src"][r, at_src:end_src] = s
            out["src_segments"][r, at_src:end_src] = segment
            out["src_positions"][r, at_src:end_src] = np.arange(len(s))
            out["tgt_in"][r, at_tgt] = BOS_ID
            out["tgt_in"][r, at_tgt + 1 : end_tgt] = t
            out["tgt_out"][r, at_tgt : end_tgt - 1] = t
            out["tgt_out"][r, end_tgt - 1] = EOS_ID
            out["tgt_segments"][r, at_tgt:end_tgt] = segment
            out["tgt_positions"][r, at_tgt:end_tgt] = np.arange(len(t) + 1)
            at_src, at_tgt = end_src, end_tgt
    return out


def plan_epoch(examples: Examples, cfg: DataConfig, row_multiple: int, seed: int, epoch: int,
               shuffle: bool = True) -> list:
    """The batches of one epoch, packed or bucketed as cfg says."""
    if cfg.pack_lengths:
        return packed_plan(examples, cfg.pack_lengths, cfg.batch_tokens, row_multiple, seed, epoch, shuffle)
    return epoch_plan(examples.lengths(), cfg.bucket_lengths, cfg.batch_tokens, row_multiple, seed, epoch, shuffle)


def local_batch(examples: Examples, cfg: DataConfig, length: int, rows, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a planned batch's rows, as arrays."""
    per_process = len(rows) // process_count
    rows = rows[process_index * per_process : (process_index + 1) * per_process]
    if cfg.pack_lengths:
        return pack_batch(examples, rows, length)
    return pad_batch(examples, rows, per_process, length)


class TrainStream:
    """Endless stream of global training batches with a resumable position.

    `position` is (epoch, index of the next batch in that epoch's plan). On several hosts each
    process takes its own contiguous slice of every global batch's rows.
    """

    def __init__(self, examples: Examples, cfg: DataConfig, seed: int, row_multiple: int = 1,
                 process_index: int = 0, process_count: int = 1):
        if not len(examples):
            raise ConfigError("no training pairs left after length filtering (check data.max_len)")
        self.examples, self.cfg, self.seed = examples, cfg, seed
        self.row_multiple = row_multiple
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.index = 0, 0
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list:
        if epoch != self._plan_epoch:
            self._plan = plan_epoch(self.examples, self.cfg, self.row_multiple, self.seed, epoch)
            self._plan_epoch = epoch
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
        length, indices = plan[self.index]
        self.index += 1
        return local_batch(self.examples, self.cfg, length, indices, self.process_index, self.process_count)


def eval_batches(examples: Examples, cfg: DataConfig, row_multiple: int = 1, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every example once, sorted by length, in the training batches' shapes (validation loss)."""
    plan = plan_epoch(examples, cfg, row_multiple, 0, 0, shuffle=False)
    return [local_batch(examples, cfg, length, rows, process_index, process_count) for length, rows in plan]


def write_jsonl_pairs(path: str | Path, src: Sequence[str], tgt: Sequence[str], src_lang: str, tgt_lang: str) -> None:
    """Writes hub-style translation records (used by tests and data preparation)."""
    with open(path, "w", encoding="utf-8") as f:
        for s, t in zip(src, tgt):
            f.write(json.dumps({"translation": {src_lang: s, tgt_lang: t}}, ensure_ascii=False) + "\n")
