"""SentencePiece tokenization with fixed special ids, trained from the training split on demand.

The model files are copied into the run directory, so a run directory alone is enough to
translate later. A trained model is also kept in a cache directory under a hash of everything its
training read (SentencePiece training is deterministic): a new run on the same data and settings
copies it instead of training again, which is most of a second start-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from transformer_mt.config import ConfigError, TokenizerConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
JOINT_FILE, SRC_FILE, TGT_FILE = "spm.model", "spm.src.model", "spm.tgt.model"


def cut_at_eos(seq: Iterable[int]) -> list[int]:
    """Ids up to (not including) the first EOS, without pad and BOS."""
    out = []
    for t in seq:
        t = int(t)
        if t == EOS_ID:
            break
        if t not in (PAD_ID, BOS_ID):
            out.append(t)
    return out


# SentencePiece encodes a list on threads of its own (one a core by default, and a new one even when
# told to use one): for the server's one-line requests that meant waiting for a core the decoding
# holds, 0.2-3.7 ms a line against 0.06-0.1 ms for the string alone, 38-45% of the event loop's time
# at 32 clients (benchmarks/RESULTS.md, 2026-12-03, fourth sitting). So lists shorter than this are
# encoded a string at a time on the calling thread; corpora (the token store's chunks of thousands)
# keep a thread a core.
THREADED_FROM = 1024


def _encode(sp: spm.SentencePieceProcessor, texts: Sequence[str]) -> list[list[int]]:
    if len(texts) < THREADED_FROM:
        return [sp.encode(text) for text in texts]
    return sp.encode(list(texts))


class Tokenizer:
    """Source and target SentencePiece processors (the same one when the vocabulary is joint)."""

    def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor, paths: Sequence[Path]):
        self.src, self.tgt, self.paths = src, tgt, tuple(Path(p) for p in paths)
        for sp, path in ((src, self.paths[0]), (tgt, self.paths[-1])):
            ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise ConfigError(f"tokenizer {path}: special ids pad/unk/bos/eos are {ids}, expected (0, 1, 2, 3)")

    @property
    def joint(self) -> bool:
        return len(self.paths) == 1

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids followed by EOS (the encoder sees where the sentence ends)."""
        return [ids + [EOS_ID] for ids in _encode(self.src, list(texts))]

    def encode_tgt(self, texts: Sequence[str]) -> list[list[int]]:
        """Target ids without BOS/EOS; the batcher adds them for teacher forcing."""
        return _encode(self.tgt, list(texts))

    def decode_tgt(self, ids: Iterable[Sequence[int]]) -> list[str]:
        """Detokenizes, cutting each sequence at its first EOS and ignoring pad/BOS."""
        return [self.tgt.decode(cut_at_eos(seq)) for seq in ids]

    def save(self, run_dir: str | Path) -> None:
        """Copies the model file(s) into run_dir under fixed names."""
        names = (JOINT_FILE,) if self.joint else (SRC_FILE, TGT_FILE)
        for src_path, name in zip(self.paths, names):
            dest = Path(run_dir) / name
            if src_path.resolve() != dest.resolve():
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.copyfile(src_path, tmp)
                tmp.replace(dest)  # a killed copy never leaves a truncated model under the final name


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise ConfigError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"tokenizer model {path} cannot be loaded: {str(e).splitlines()[0]}") from None


def load_paths(paths: Sequence[str | Path]) -> Tokenizer:
    """One path: joint vocabulary; two paths: separate source and target vocabularies."""
    paths = [Path(p) for p in paths]
    if len(paths) not in (1, 2):
        raise ConfigError("tokenizer.model_paths takes one (joint) or two (source, target) files")
    procs = [_load_processor(p) for p in paths]
    return Tokenizer(procs[0], procs[-1], paths)


def load_from_run(run_dir: str | Path) -> Tokenizer:
    run_dir = Path(run_dir)
    if (run_dir / JOINT_FILE).is_file():
        return load_paths([run_dir / JOINT_FILE])
    if (run_dir / SRC_FILE).is_file():
        return load_paths([run_dir / SRC_FILE, run_dir / TGT_FILE])
    raise ConfigError(f"no tokenizer ({JOINT_FILE} or {SRC_FILE}) in run directory {run_dir}")


# Samples larger than this train in a child process, which a stop signal can end at once
# (SentencePiece's C++ training does not return to Python, and so to a signal handler, until done).
CHILD_PROCESS_LINES = 200_000


def _spm_train_to(kwargs: dict, lines_path: str, model_path: str, error_path: str) -> None:
    """Child process body: trains on the lines of a file, writes the model or the error."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop us
    try:
        with open(lines_path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **kwargs)
        Path(model_path).write_bytes(model.getvalue())
    except Exception as e:  # reported by the parent in one line
        Path(error_path).write_text(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _train_in_child(kwargs: dict, lines: Sequence[str], should_stop) -> bytes:
    import subprocess
    import sys
    import time

    from transformer_mt.corpus import Interrupted

    with tempfile.TemporaryDirectory(prefix="spm-train-") as tmp:
        paths = [os.path.join(tmp, name) for name in ("lines.txt", "model", "error")]
        with open(paths[0], "w", encoding="utf-8") as f:
            f.writelines(line.replace("\n", " ") + "\n" for line in lines)
        code = "import json, sys; from transformer_mt.tokenizer import _spm_train_to; " \
               "_spm_train_to(json.loads(sys.argv[1]), *sys.argv[2:])"
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs), *paths])
        while child.poll() is None:
            if should_stop():
                child.kill()
                child.wait()
                raise Interrupted("stopped while training the tokenizer")
            time.sleep(0.05)
        if os.path.exists(paths[2]):
            raise ConfigError(f"tokenizer training failed: {Path(paths[2]).read_text()}")
        if child.returncode or not os.path.exists(paths[1]):
            raise ConfigError(f"tokenizer training failed: its process exited with code {child.returncode}")
        return Path(paths[1]).read_bytes()


def _train_one(texts: Sequence[str], path: Path, cfg: TokenizerConfig, seed: int, should_stop=None) -> Path:
    lines = [t for t in texts if t.strip()]
    if cfg.input_sentence_size and len(lines) > cfg.input_sentence_size:
        lines = random.Random(seed).sample(lines, cfg.input_sentence_size)
    if not lines:
        raise ConfigError("cannot train a tokenizer: the training data has no non-empty lines")
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        minloglevel=2,
        num_threads=2,
        # Small corpora cannot always reach vocab_size: treat it as an upper bound.
        hard_vocab_limit=False,
    )
    if should_stop is not None and len(lines) > CHILD_PROCESS_LINES:
        data = _train_in_child(kwargs, lines, should_stop)
    else:
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"tokenizer training failed: {str(e).splitlines()[0]}") from None
        data = model.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def train(cfg: TokenizerConfig, src_texts: Sequence[str], tgt_texts: Sequence[str], out_dir: str | Path, seed: int = 0,
          should_stop=None) -> Tokenizer:
    """Trains SentencePiece on the training split, writing the model(s) into out_dir. With
    should_stop (a callable), a large sample trains in a child process that it can end."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.joint:
        path = _train_one(list(src_texts) + list(tgt_texts), out_dir / JOINT_FILE, cfg, seed, should_stop)
        return load_paths([path])
    src = _train_one(src_texts, out_dir / SRC_FILE, cfg, seed, should_stop)
    tgt = _train_one(tgt_texts, out_dir / TGT_FILE, cfg, seed, should_stop)
    return load_paths([src, tgt])


# Part of every cache key: bump it when _train_one's fixed SentencePiece options change.
CACHE_VERSION = 1


def cache_key(cfg: TokenizerConfig, src_texts: Sequence[str], tgt_texts: Sequence[str], seed: int) -> str:
    """A hash of everything tokenizer training reads: settings, seed, versions and the text."""
    settings = [CACHE_VERSION, spm.__version__, dataclasses.asdict(cfg), seed]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for texts in (src_texts, tgt_texts):
        h.update(len(texts).to_bytes(8, "little"))
        for text in texts:
            data = text.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:32]


def _model_names(cfg: TokenizerConfig) -> tuple[str, ...]:
    return (JOINT_FILE,) if cfg.joint else (SRC_FILE, TGT_FILE)


def _store(run_dir: Path, entry: Path, names: Sequence[str]) -> None:
    """Copies the run's trained model(s) into the cache entry, whole or not at all."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp", dir=entry.parent))
    except OSError:
        return  # an unwritable cache only costs speed
    try:
        for name in names:
            shutil.copyfile(run_dir / name, tmp / name)
        os.replace(tmp, entry)
    except OSError:  # another process stored the same entry first, or the disk is full
        shutil.rmtree(tmp, ignore_errors=True)


def _from_cache(entry: Path, names: Sequence[str], run_dir: Path) -> Tokenizer | None:
    """The cached model(s) copied into the run directory, or None if the entry is absent or unreadable."""
    if not all((entry / name).is_file() for name in names):
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        load_paths([entry / name for name in names]).save(run_dir)
    except (ConfigError, OSError):
        return None
    return load_from_run(run_dir)


def data_cache_key(cfg: TokenizerConfig, data_fingerprint: str, seed: int) -> str:
    """A second name for a cache entry: the corpus fingerprint (corpus.py) instead of its text, so
    a new run on a large corpus finds its tokenizer without reading the corpus."""
    settings = [CACHE_VERSION, spm.__version__, dataclasses.asdict(cfg), seed, data_fingerprint]
    return "data-" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_or_train(cfg: TokenizerConfig, run_dir: str | Path, train_pairs, seed: int = 0,
                  cache_dir: str | Path | None = None, data_fingerprint: str | None = None,
                  should_stop=None) -> Tokenizer:
    """The run's own tokenizer if present, else cfg.model_paths, else one from `cache_dir` trained
    earlier on the same text (or the same corpus fingerprint) and settings, else one trained now
    (and stored in `cache_dir` under both names).

    `train_pairs` is a callable returning (src_texts, tgt_texts), called only if training is needed.
    """
    run_dir = Path(run_dir)
    # Separate vocabularies are written one after the other: a run killed in between has only the
    # source model, and trains (or copies) both again.
    if (run_dir / JOINT_FILE).is_file() or ((run_dir / SRC_FILE).is_file() and (run_dir / TGT_FILE).is_file()):
        tok = load_from_run(run_dir)
    elif cfg.model_paths:
        tok = load_paths(cfg.model_paths)
        tok.save(run_dir)
        tok = load_from_run(run_dir)
    else:
        names = _model_names(cfg)
        by_data = Path(cache_dir) / data_cache_key(cfg, data_fingerprint, seed) if cache_dir and data_fingerprint else None
        tok = _from_cache(by_data, names, run_dir) if by_data is not None else None
        if tok is None:
            src, tgt = train_pairs()
            entry = Path(cache_dir) / cache_key(cfg, src, tgt, seed) if cache_dir else None
            tok = _from_cache(entry, names, run_dir) if entry is not None else None
            if tok is None:
                tok = train(cfg, src, tgt, run_dir, seed, should_stop)
                if entry is not None:
                    _store(run_dir, entry, names)
            if by_data is not None:
                _store(run_dir, by_data, names)
    if tok.joint != cfg.joint:
        raise ConfigError(
            f"tokenizer in {run_dir} is {'joint' if tok.joint else 'separate'} but tokenizer.joint={cfg.joint}"
        )
    return tok
