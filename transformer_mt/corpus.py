"""Streaming a training corpus in chunks of raw pairs, whatever its size or source.

Nothing here holds more than a chunk of the corpus: local parallel text (.gz too), one .tsv or
.jsonl file, or a Hugging Face dataset in streaming mode. The chunks go to the token store's
builder (store.py), which parses and tokenizes them in worker processes; that is why a chunk of
local files carries raw bytes lines: decoding them is part of the parallel work.

Also here: the fingerprint of a corpus (what the store and tokenizer caches are keyed by) and a
bounded sample of it for tokenizer training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from transformer_mt.config import ConfigError, DataConfig

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

READ_HINT = 1 << 20  # bytes per readlines() call


@dataclass
class Chunk:
    """Consecutive pairs starting at 1-based line (or record) `first`.

    kind "pair_bytes": src and tgt are raw lines of two parallel files; "tsv"/"jsonl": src holds the
    raw lines of one file, tgt is None; "texts": src and tgt are decoded strings (hub records).
    """

    kind: str
    first: int
    src: list
    tgt: list | None
    where: str  # file or dataset name, for messages


class Interrupted(RuntimeError):
    """The user stopped the launch (SIGTERM/SIGINT) while the corpus was being read."""


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    return path


class _Lines:
    """Raw lines of a file (.gz decompressed) handed out n at a time, read in large blocks."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb")
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if path.name.endswith(".gz") else self.raw
        self.buffer: list[bytes] = []
        self.count = 0  # lines handed out so far
        self.done = False

    def take(self, n: int) -> list[bytes]:
        while len(self.buffer) < n and not self.done:
            try:
                block = self.stream.readlines(READ_HINT)
            except (OSError, EOFError) as e:
                raise ConfigError(f"{self.path}: not a valid gzip file, or damaged after line {self.count} ({e})") from None
            if block:
                self.buffer += block
            else:
                self.done = True
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        self.count += len(out)
        return out

    def count_rest(self) -> int:
        while self.take(1 << 16):
            pass
        return self.count

    def position(self) -> int:
        """Bytes of the file (compressed, for .gz) read so far: progress against its size."""
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def local_kind(files: Sequence[str]) -> str:
    paths = [_require_file(f) for f in files]
    if len(paths) == 2:
        return "pair_bytes"
    if len(paths) == 1:
        name = paths[0].name.removesuffix(".gz")
        if name.endswith(".tsv"):
            return "tsv"
        if name.endswith((".jsonl", ".json")):
            return "jsonl"
        raise ConfigError(f"{paths[0]}: a single data file must be .tsv or .jsonl; give two files for parallel text")
    raise ConfigError(f"expected one (.tsv/.jsonl) or two (parallel text) data files, got {len(paths)}")


def _local_chunks(files: Sequence[str], size: int, limit: int, progress: Callable[[int], None] | None,
                  should_stop: Callable[[], bool]) -> Iterator[Chunk]:
    kind = local_kind(files)
    readers = [_Lines(Path(f)) for f in files]
    first, read_bytes = 1, 0
    try:
        while True:
            if should_stop():
                raise Interrupted("stopped while reading the corpus")
            n = size if not limit else min(size, limit - first + 1)
            if n <= 0:
                return
            blocks = [r.take(n) for r in readers]
            if len(blocks) == 2 and len(blocks[0]) != len(blocks[1]):
                counts = [r.count_rest() for r in readers]
                raise ConfigError(f"parallel files differ in length: {files[0]} has {counts[0]} lines, "
                                  f"{files[1]} has {counts[1]}")
            if not blocks[0]:
                return
            yield Chunk(kind, first, blocks[0], blocks[1] if len(blocks) == 2 else None, str(files[0]))
            first += len(blocks[0])
            if progress is not None:
                now = sum(r.position() for r in readers)
                progress(now - read_bytes)
                read_bytes = now
    finally:
        for r in readers:
            r.close()


def translation_columns(batch: dict, where: str, src_lang: str, tgt_lang: str) -> tuple[list, list]:
    """Source and target strings of a batch of hub records: {"translation": {src:, tgt:}} (wmt14,
    iwslt2017) or flat {src:, tgt:} columns."""
    if "translation" in batch:
        try:
            return [p[src_lang] for p in batch["translation"]], [p[tgt_lang] for p in batch["translation"]]
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: translation records lack languages '{src_lang}'/'{tgt_lang}'") from None
    if src_lang in batch and tgt_lang in batch:
        return list(batch[src_lang]), list(batch[tgt_lang])
    raise ConfigError(f"{where}: expected a 'translation' column or columns '{src_lang}' and '{tgt_lang}', "
                      f"found {sorted(batch)}")


def open_hub(cfg: DataConfig, split: str, streaming: bool):
    """datasets.load_dataset for data.dataset (a hub name or a local dataset directory)."""
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, split=split, streaming=streaming,
                                     revision=cfg.dataset_revision or None)
    except Exception as e:  # datasets raises many types; the user needs the name
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load hub dataset {cfg.dataset}/{cfg.dataset_config} split {split}: {msg}") from None


def _hub_chunks(cfg: DataConfig, split: str, size: int, limit: int, should_stop: Callable[[], bool]) -> Iterator[Chunk]:
    records = open_hub(cfg, split, streaming=True)
    first, where = 1, f"{cfg.dataset}/{split}"
    for batch in records.iter(batch_size=size):
        if should_stop():
            raise Interrupted("stopped while reading the corpus")
        src, tgt = translation_columns(batch, where, cfg.src_lang, cfg.tgt_lang)
        if limit:
            src, tgt = src[: limit - first + 1], tgt[: limit - first + 1]
        if not src:
            return
        yield Chunk("texts", first, [s or "" for s in src], [t or "" for t in tgt], where)
        first += len(src)


def split_chunks(cfg: DataConfig, split: str = "train", size: int = 1 << 16,
                 progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
    """Split 'train', 'valid' or 'test' as chunks of about `size` pairs; the training split
    honours data.max_train_examples. Nothing when the split has no source."""
    files = {"train": cfg.train_files, "valid": cfg.valid_files, "test": cfg.test_files}[split]
    limit = cfg.max_train_examples if split == "train" else 0
    if files:
        return _local_chunks(files, size, limit, progress, should_stop)
    if cfg.dataset:
        hub_split = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}[split]
        return _hub_chunks(cfg, hub_split, size, limit, should_stop)
    if split == "train":
        raise ConfigError("no training data: set data.train_files or data.dataset")
    return iter(())


def train_chunks(cfg: DataConfig, size: int = 1 << 16, progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
    return split_chunks(cfg, "train", size, progress, should_stop)


def load_split(cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    """A whole (small) split in memory: validation, test, or a small training set. Invalid UTF-8
    is replaced by U+FFFD, with one warning naming the first lines."""
    src: list[str] = []
    tgt: list[str] = []
    bad: list[int] = []
    where = ""
    for chunk in split_chunks(cfg, split):
        s, t = parse_chunk(chunk, cfg.src_lang, cfg.tgt_lang, bad)
        src += s
        tgt += t
        where = chunk.where
    if bad:
        from transformer_mt.textio import warn

        warn(f"{where}: {len(bad)} line(s) with invalid UTF-8 replaced with U+FFFD (first at line "
             f"{', '.join(map(str, bad[:5]))})")
    return src, tgt


def read_local(files: Sequence[str], src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Two files: parallel plain text; one file: .tsv or .jsonl (optionally .gz)."""
    return load_split(DataConfig(train_files=tuple(files), src_lang=src_lang, tgt_lang=tgt_lang), "train")


def read_hub(name: str, config_name: str, split: str, src_lang: str, tgt_lang: str, revision: str = ""
             ) -> tuple[list[str], list[str]]:
    """A split of a Hugging Face hub dataset (or a local directory in its layout), streamed."""
    return load_split(DataConfig(dataset=name, dataset_config=config_name, dataset_revision=revision,
                                 src_lang=src_lang, tgt_lang=tgt_lang, train_split=split), "train")


def write_jsonl_pairs(path: str | Path, src: Sequence[str], tgt: Sequence[str], src_lang: str, tgt_lang: str) -> None:
    """Writes hub-style translation records (used by tests and data preparation)."""
    with open(path, "w", encoding="utf-8") as f:
        for s, t in zip(src, tgt):
            f.write(json.dumps({"translation": {src_lang: s, tgt_lang: t}}, ensure_ascii=False) + "\n")


def input_bytes(cfg: DataConfig) -> int | None:
    """Size on disk of the local training files (progress total), None for a hub dataset."""
    return sum(Path(f).stat().st_size for f in cfg.train_files) if cfg.train_files else None


# ----------------------------------------------------------------------------- fingerprint

FINGERPRINT_VERSION = 1
_EDGE = 1 << 16  # bytes hashed at each end of a file, beside its size and mtime


def _file_fingerprint(path: Path) -> list:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > 2 * _EDGE:
            f.seek(-_EDGE, os.SEEK_END)
        h.update(f.read(_EDGE))
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, h.hexdigest()]


def fingerprint(cfg: DataConfig) -> str:
    """A hash naming the training corpus as read: files (path, size, mtime, both ends' bytes), or the
    hub dataset (name, config, split, revision; a local dataset directory's files), and the cap
    on pairs read. Costs milliseconds whatever the corpus size."""
    if cfg.train_files:
        source = [_file_fingerprint(_require_file(f)) for f in cfg.train_files]
    elif cfg.dataset:
        source = [cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.dataset_revision]
        root = Path(cfg.dataset)
        if root.is_dir():
            source += [_file_fingerprint(p) for p in sorted(root.rglob("*")) if p.is_file()]
    else:
        raise ConfigError("no training data: set data.train_files or data.dataset")
    record = [FINGERPRINT_VERSION, source, cfg.src_lang, cfg.tgt_lang, cfg.max_train_examples]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- decoding


def decode_block(raw_lines: Sequence[bytes], first: int, bad_lines: list) -> list[str]:
    """Raw lines -> str (split on '\\n' only, a trailing '\\r' dropped). Invalid UTF-8 is replaced
    by U+FFFD and the line number appended to bad_lines."""
    try:
        text = b"".join(raw_lines).decode("utf-8")
    except UnicodeDecodeError:
        out = []
        for n, raw in enumerate(raw_lines, start=first):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad_lines.append(n)
                out.append(raw.decode("utf-8", errors="replace"))
        return [line.removesuffix("\n").removesuffix("\r") for line in out]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) < len(raw_lines):  # the last line had no '\n'
        lines.append("")
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    return lines


def parse_chunk(chunk: Chunk, src_lang: str, tgt_lang: str, bad_lines: list) -> tuple[list[str], list[str]]:
    """A chunk's (source, target) strings."""
    if chunk.kind == "texts":
        return chunk.src, chunk.tgt
    if chunk.kind == "pair_bytes":
        return decode_block(chunk.src, chunk.first, bad_lines), decode_block(chunk.tgt, chunk.first, [])
    lines = decode_block(chunk.src, chunk.first, bad_lines)
    src, tgt = [], []
    if chunk.kind == "tsv":
        for n, line in enumerate(lines, start=chunk.first):
            fields = line.split("\t")
            if len(fields) != 2:
                raise ConfigError(f"{chunk.where} line {n}: expected 2 tab-separated fields, found {len(fields)}")
            src.append(fields[0])
            tgt.append(fields[1])
        return src, tgt
    for n, line in enumerate(lines, start=chunk.first):
        if not line.strip():
            raise ConfigError(f"{chunk.where} line {n}: empty line where a JSON record was expected")
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{chunk.where} line {n}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{chunk.where} line {n}: expected a JSON object")
        if "translation" in record:
            record = record["translation"]
        try:
            s, t = record[src_lang], record[tgt_lang]
        except (KeyError, TypeError):
            raise ConfigError(f"{chunk.where} line {n}: record lacks languages '{src_lang}'/'{tgt_lang}'") from None
        src.append(s or "")
        tgt.append(t or "")
    return src, tgt


# ----------------------------------------------------------------------------- tokenizer sample


def sample_pairs(cfg: DataConfig, k: int, seed: int, should_stop: Callable[[], bool] = lambda: False
                 ) -> tuple[list[str], list[str]]:
    """Up to k training pairs for tokenizer training, in one streaming pass: all of them, in order,
    when the corpus has no more (so a small corpus trains exactly as it always did), else a
    uniform reservoir sample (seeded). Memory: k pairs."""
    src: list[str] = []
    tgt: list[str] = []
    rng = random.Random(seed)
    seen = 0
    for chunk in train_chunks(cfg, should_stop=should_stop):
        s, t = parse_chunk(chunk, cfg.src_lang, cfg.tgt_lang, [])
        for a, b in zip(s, t):
            if seen < k:
                src.append(a)
                tgt.append(b)
            else:
                j = rng.randrange(seen + 1)
                if j < k:
                    src[j], tgt[j] = a, b
            seen += 1
    return src, tgt
