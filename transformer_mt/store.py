"""The token store: a training corpus tokenized once, read pair by pair ever after.

A store is a directory of flat arrays: each side's token ids (uint16 when the vocabulary fits,
else uint32) one pair after another, each pair's offset (int64) and length, and meta.json. It is
built in streamed chunks (never the whole corpus in memory) by worker processes that parse and
tokenize while the main process reads and writes, into a temporary directory renamed into place
when complete, so a killed build leaves nothing that loads. Its name is a hash of everything that
decides its contents: the corpus fingerprint (corpus.py), the tokenizer model's bytes, the
filter (max_len) and the format version; every run on the same data and tokenizer shares it.

Why not Hugging Face `datasets` (Arrow, memory-mapped, fingerprinted)? Its `map` would give the
same kind of file, but holds each batch as Python lists through Arrow conversion and keys its
cache by a fingerprint of the transforms rather than of the corpus and tokenizer bytes; the flat
files here are what the batcher reads a batch's pairs from, and cost 4 bytes a pair of RAM
(benchmarks/RESULTS.md, "Token store"). Training reads them with positioned reads, not a memory
map: see data.FileSide.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from transformer_mt import corpus
from transformer_mt.config import ConfigError, DataConfig
from transformer_mt.data import Examples, FileSide, keep_mask

FORMAT_VERSION = 1
CHUNK_PAIRS = 1 << 15
SMALL_INPUT = 16 << 20  # bytes of input below which tokenizing in this process beats starting workers
SHOWN = 5  # line numbers shown per kind of dropped or repaired line
META = "meta.json"
# Test hook (tests/test_store.py): with this set, a build holds after writing its first chunk until
# it is told to stop, so a test can signal or kill it mid-build without racing it.
HOLD_ENV = "TRANSFORMER_MT_TEST_HOLD_BUILD"


def default_dir(cfg: DataConfig) -> Path:
    if cfg.store_dir:
        return Path(cfg.store_dir)
    if os.environ.get("TRANSFORMER_MT_STORE_DIR"):
        return Path(os.environ["TRANSFORMER_MT_STORE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transformer_mt" / "stores"


def store_key(cfg: DataConfig, tokenizer_paths, data_fingerprint: str | None = None) -> str:
    """The store's name: a hash of the corpus fingerprint, the tokenizer model(s), the filter and
    the format version."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, data_fingerprint or corpus.fingerprint(cfg), cfg.max_len]).encode())
    for path in tokenizer_paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- building


@dataclass
class Report:
    """Pairs read, kept and dropped, with the first line numbers of each kind (reported once)."""

    read: int = 0
    kept: int = 0
    lines: dict = field(default_factory=lambda: {"empty": [], "too_long": [], "invalid_utf8": []})
    counts: dict = field(default_factory=lambda: {"empty": 0, "too_long": 0, "invalid_utf8": 0})

    def add(self, kind: str, line_numbers) -> None:
        self.counts[kind] += len(line_numbers)
        self.lines[kind] += [int(n) for n in line_numbers[: SHOWN - len(self.lines[kind])]]

    def summary(self, max_len: int) -> list[str]:
        """One line per kind of line that was dropped or repaired."""
        what = {"empty": "pairs with an empty side dropped",
                "too_long": f"pairs longer than data.max_len={max_len} tokens dropped",
                "invalid_utf8": "lines with invalid UTF-8 (replaced by U+FFFD)"}
        return [f"{self.counts[k]:,} {what[k]} (first at line {', '.join(map(str, self.lines[k]))})"
                for k in what if self.counts[k]]


_worker_tok = None


def _init_worker(paths: list[str]) -> None:
    import signal

    from transformer_mt import tokenizer as tok_lib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the build, then us
    global _worker_tok
    _worker_tok = tok_lib.load_paths(paths)


def _flat(seqs: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype, count=int(lengths.sum()))
    return flat, lengths


def tokenize_chunk(chunk: corpus.Chunk, src_lang: str, tgt_lang: str, max_len: int, dtype: str, tok=None) -> dict:
    """Parses and tokenizes one chunk; returns the kept pairs' flat ids and lengths and what was dropped."""
    tok = tok or _worker_tok
    bad: list[int] = []
    src, tgt = corpus.parse_chunk(chunk, src_lang, tgt_lang, bad)
    src_ids, tgt_ids = tok.encode_src(src), tok.encode_tgt(tgt)
    src_flat, src_len = _flat(src_ids, dtype)
    tgt_flat, tgt_len = _flat(tgt_ids, dtype)
    empty = (src_len <= 1) | (tgt_len == 0)
    keep = keep_mask(src_len, tgt_len, max_len)
    line = np.arange(chunk.first, chunk.first + len(src))
    return {
        "src": src_flat[np.repeat(keep, src_len)], "src_len": src_len[keep],
        "tgt": tgt_flat[np.repeat(keep, tgt_len)], "tgt_len": tgt_len[keep],
        "read": len(src), "empty": line[empty][:SHOWN], "n_empty": int(empty.sum()),
        "too_long": line[~keep & ~empty][:SHOWN], "n_too_long": int((~keep & ~empty).sum()),
        "invalid_utf8": bad,
    }


class _Writer:
    """Appends tokenized chunks to the store's files in the temporary directory."""

    def __init__(self, directory: Path, dtype: str, len_dtype: str):
        self.directory, self.dtype, self.len_dtype = directory, dtype, len_dtype
        self.files = {name: open(directory / name, "wb") for name in
                      ("src.ids", "tgt.ids", "src.len", "tgt.len", "src.off", "tgt.off")}
        self.ends = {"src": 0, "tgt": 0}
        for side in ("src", "tgt"):
            self.files[f"{side}.off"].write(np.zeros(1, np.int64).tobytes())
        self.report = Report()

    def add(self, part: dict) -> None:
        for side in ("src", "tgt"):
            self.files[f"{side}.ids"].write(part[side].astype(self.dtype, copy=False).tobytes())
            self.files[f"{side}.len"].write(part[f"{side}_len"].astype(self.len_dtype).tobytes())
            ends = self.ends[side] + np.cumsum(part[f"{side}_len"], dtype=np.int64)
            self.files[f"{side}.off"].write(ends.tobytes())
            self.ends[side] = int(ends[-1]) if len(ends) else self.ends[side]
        r = self.report
        r.read += part["read"]
        r.kept += len(part["src_len"])
        r.counts["empty"] += part["n_empty"] - len(part["empty"])
        r.counts["too_long"] += part["n_too_long"] - len(part["too_long"])
        for kind in ("empty", "too_long", "invalid_utf8"):
            r.add(kind, list(part[kind]))

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Temporary directories of builds whose process is gone (killed, crashed)."""
    for tmp in root.glob("*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def build(cfg: DataConfig, tok, directory: Path, workers: int | None = None, progress: bool = True,
          should_stop: Callable[[], bool] = lambda: False) -> Path:
    """Tokenizes the training corpus into `directory` (atomically: a temporary directory renamed
    into place); `workers` tokenizing processes (None: 2 for inputs over SMALL_INPUT, else 0)."""
    from tqdm import tqdm

    root = directory.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root / f"{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    vocab = max(tok.src_vocab_size, tok.tgt_vocab_size)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    len_dtype = "uint16" if cfg.max_len < 1 << 16 else "uint32"
    size = corpus.input_bytes(cfg)
    if workers is None:
        workers = 2 if size is None or size > SMALL_INPUT else 0
    bar = tqdm(total=size, unit="B" if size else " pairs", unit_scale=True, desc="tokenizing corpus",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)
    pool = None
    t0 = time.time()
    try:
        writer = _Writer(tmp, dtype, len_dtype)
        chunks = corpus.train_chunks(cfg, CHUNK_PAIRS, progress=bar.update if size else None, should_stop=should_stop)
        args = (cfg.src_lang, cfg.tgt_lang, cfg.max_len, dtype)
        if workers:
            pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_init_worker, initargs=([str(p) for p in tok.paths],))
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(tokenize_chunk, chunk, *args))
                while len(pending) > 2 * workers:
                    writer.add(pending.popleft().result())
                if size is None:
                    bar.update(len(chunk.src))
            while pending:
                if should_stop():
                    raise corpus.Interrupted("stopped while tokenizing the corpus")
                writer.add(pending.popleft().result())
        else:
            for chunk in chunks:
                writer.add(tokenize_chunk(chunk, *args, tok=tok))
                if os.environ.get(HOLD_ENV):
                    print(f"build held in {tmp}", file=sys.stderr, flush=True)
                    while not should_stop():
                        time.sleep(0.01)
        writer.close()
        report = writer.report
        if not report.kept:
            raise ConfigError("no training pairs left after length filtering (check data.max_len)")
        meta = {"version": FORMAT_VERSION, "pairs": report.kept, "read": report.read, "dtype": dtype,
                "len_dtype": len_dtype, "tokens": writer.ends, "dropped": report.counts, "first_lines": report.lines,
                "max_len": cfg.max_len, "tokenizer": [str(p) for p in tok.paths],
                "source": list(cfg.train_files) or [cfg.dataset, cfg.dataset_config, cfg.train_split],
                "build_seconds": round(time.time() - t0, 1)}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same store first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for line in report.summary(cfg.max_len):
                print(f"training data: {line}", file=sys.stderr, flush=True)
        return directory
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()


# ----------------------------------------------------------------------------- loading


def load(directory: Path) -> Examples:
    """The store's pairs: lengths read into RAM (2-4 bytes a pair a side), tokens read from the
    files batch by batch (data.FileSide)."""
    meta = json.loads((directory / META).read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"token store {directory} has format {meta.get('version')}, expected {FORMAT_VERSION}")
    n = meta["pairs"]

    def check(name, dtype, count):
        path = directory / name
        if path.stat().st_size != count * np.dtype(dtype).itemsize:
            raise ConfigError(f"token store {directory}: {name} is damaged (wrong size); delete the directory")
        return path

    sides = []
    for side in ("src", "tgt"):
        ids = check(f"{side}.ids", meta["dtype"], meta["tokens"][side])
        offsets = check(f"{side}.off", np.int64, n + 1)
        lengths = np.fromfile(check(f"{side}.len", meta["len_dtype"], n), meta["len_dtype"])
        sides += [FileSide(ids, offsets, meta["dtype"]), lengths]
    return Examples.from_sides(*sides)


def open_or_build(cfg: DataConfig, tok, progress: bool = True, should_stop: Callable[[], bool] = lambda: False,
                  workers: int | None = None, data_fingerprint: str | None = None) -> tuple[Examples, Path]:
    """The training pairs from the store for (corpus, tokenizer, filter), building it if missing."""
    directory = default_dir(cfg) / store_key(cfg, tok.paths, data_fingerprint)
    if not (directory / META).is_file():
        build(cfg, tok, directory, workers=workers, progress=progress, should_stop=should_stop)
    return load(directory), directory
