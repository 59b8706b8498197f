"""Typed, frozen experiment configuration loaded from YAML with dotted overrides.

One YAML file describes one experiment. Every key maps to a field of a frozen dataclass
below, so a typo is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; its message is one line."""


@dataclass(frozen=True)
class DataConfig:
    """Where the parallel text comes from and how it is batched."""

    # Hugging Face hub dataset name (e.g. "wmt14"); empty for local files.
    dataset: str = ""
    # Hub dataset config (e.g. "de-en").
    dataset_config: str = ""
    # Hub dataset revision (a commit or tag; empty = the default branch). Part of the token store's key.
    dataset_revision: str = ""
    src_lang: str = "en"
    tgt_lang: str = "de"
    # Hub split names.
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str = "test"
    # Local files: two parallel text files [src, tgt] (.gz allowed), or one .tsv / .jsonl file.
    train_files: tuple[str, ...] = ()
    valid_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    # Training pairs longer than this (in tokens, either side, incl. BOS/EOS) are dropped.
    max_len: int = 128
    # Target padded tokens per global batch (batch rows = batch_tokens // bucket length).
    batch_tokens: int = 4096
    # Padded sequence lengths; each batch is padded to the smallest one that fits.
    bucket_lengths: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128)
    # Training and validation batches: empty pads each pair to its bucket length (one compile per
    # bucket); lengths [N, ...] pack several pairs into each row of N tokens per side, kept apart
    # by segment ids: a pair goes to the shortest row length that holds it (one compile per
    # length, little padding; rows = batch_tokens // N). The last must be >= max_len.
    pack_lengths: tuple[int, ...] = ()
    # Cap on training pairs read (0 = all); handy for smoke tests.
    max_train_examples: int = 0
    # Where tokenized training corpora (token stores) are kept; empty = $TRANSFORMER_MT_STORE_DIR,
    # else ~/.cache/transformer_mt/stores. A store is reused by every run on the same data and tokenizer.
    store_dir: str = ""


@dataclass(frozen=True)
class TokenizerConfig:
    """SentencePiece settings; a model is trained from the training split when none is given."""

    # unigram or bpe
    model_type: str = "unigram"
    vocab_size: int = 8000
    # One vocabulary for both languages (needed for tied source/target embeddings).
    joint: bool = True
    # Existing SentencePiece model(s) to use instead of training: one path if joint, else two.
    model_paths: tuple[str, ...] = ()
    character_coverage: float = 1.0
    # Sentences sampled for tokenizer training (0 = all).
    input_sentence_size: int = 1_000_000


@dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder Transformer shape."""

    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dim: int = 2048
    # Dropout on embeddings and on each sub-layer's output before the residual sum.
    dropout: float = 0.1
    # Dropout on attention weights.
    attention_dropout: float = 0.0
    # Dropout after the FFN activation (fairseq's activation_dropout; costly on CPU, off by default).
    activation_dropout: float = 0.0
    # True: x + f(LN(x)) (stable, default); False: LN(x + f(x)) as in the 2017 paper.
    pre_norm: bool = True
    # sinusoidal or rotary
    positional: str = "sinusoidal"
    # Share source/target embeddings and the output projection (needs a joint vocabulary).
    tie_embeddings: bool = True
    # Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16.
    # Parameters, optimizer state, softmax and loss stay float32.
    dtype: str = "auto"
    # Matmul input dtype of a float32 model: auto (bfloat16 on CPUs with native bf16 dots, i.e.
    # AVX512-BF16 or AMX, else float32), float32 or bfloat16. Products accumulate in float32.
    matmul_dtype: str = "auto"
    # Longest sequence the model is meant to see (sizes decode caches; sinusoids are unbounded).
    max_len: int = 256


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging, validation and checkpointing."""

    seed: int = 0
    max_steps: int = 100_000
    # Stop after this many minutes of training (0 = no limit); checked between steps.
    time_limit_minutes: float = 0.0
    learning_rate: float = 7e-4
    warmup_steps: int = 4000
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    # Micro-batches summed per optimizer step: effective batch = grad_accum * batch_tokens.
    grad_accum: int = 1
    log_every: int = 50
    # Validation loss every N steps (0 = off).
    eval_every: int = 1000
    # Validation BLEU every N steps (0 = off); the best checkpoint by BLEU is kept.
    bleu_every: int = 0
    # Validation sentences used for BLEU (0 = all).
    bleu_subset: int = 0
    # Stop after this many BLEU validations without gain (0 = never).
    patience: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # What to do with a non-finite loss or gradient: skip (the update) or stop.
    on_nonfinite: str = "skip"


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings used for validation BLEU and as translate defaults."""

    beam_size: int = 4
    # GNMT length penalty exponent ((5 + len) / 6) ** alpha.
    alpha: float = 0.6
    # Output length limit: a * source_length + b, capped at max_len_cap.
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_len_cap: int = 256
    # Padded source tokens per decoding batch.
    batch_tokens: int = 4096
    # Decoding matmul inputs: float32 (exact), bf16 (float32 sums), int8 (per-channel scales), or
    # auto: int8 where our int8 kernel runs (int8_kernel.py: AVX512-VNNI and a C++ compiler); else, on CPUs
    # with native bf16 dots (AVX512-BF16/AMX), int8 for d_model >= 512 and bf16 below; float32 elsewhere.
    precision: str = "auto"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks `value` against a field's type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(_coerce(v, item_hint, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {hint}")  # pragma: no cover


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    return _build(Config, raw, "")


def to_dict(config: Config) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `section.key=value` strings (values parsed as YAML) to a raw config dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key '{dotted}' must be section.key, e.g. model.num_heads")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML") from None
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"config section '{parts[0]}' is not a mapping")
        section[parts[1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML{problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return raw


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config (or the defaults when path is None) and applies overrides."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    config = from_dict(raw)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks, one-line errors."""
    m, t, d, tok = config.model, config.train, config.data, config.tokenizer
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads})")
    if m.positional == "rotary" and (m.d_model // m.num_heads) % 2:
        raise ConfigError("model.positional=rotary needs an even head dimension")
    choices = {
        "model.positional": (m.positional, ("sinusoidal", "rotary")),
        "model.dtype": (m.dtype, ("auto", "float32", "bfloat16")),
        "model.matmul_dtype": (m.matmul_dtype, ("auto", "float32", "bfloat16")),
        "tokenizer.model_type": (tok.model_type, ("unigram", "bpe")),
        "train.on_nonfinite": (t.on_nonfinite, ("skip", "stop")),
        "decode.precision": (config.decode.precision, ("auto", "float32", "bf16", "int8")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
    if m.tie_embeddings and not tok.joint:
        raise ConfigError("model.tie_embeddings needs tokenizer.joint=true")
    if not d.bucket_lengths or list(d.bucket_lengths) != sorted(set(d.bucket_lengths)):
        raise ConfigError("data.bucket_lengths must be a non-empty increasing list")
    if d.max_len > d.bucket_lengths[-1]:
        raise ConfigError(
            f"data.max_len ({d.max_len}) exceeds the largest bucket ({d.bucket_lengths[-1]})"
        )
    if d.batch_tokens < d.bucket_lengths[-1]:
        raise ConfigError("data.batch_tokens must hold at least one sequence of the largest bucket")
    if d.pack_lengths:
        if list(d.pack_lengths) != sorted(set(d.pack_lengths)) or d.pack_lengths[0] < 1:
            raise ConfigError("data.pack_lengths must be an increasing list of positive lengths (or [] for buckets)")
        if d.pack_lengths[-1] < d.max_len:
            raise ConfigError(f"data.pack_lengths: the longest ({d.pack_lengths[-1]}) must be at least data.max_len "
                              f"({d.max_len}), so that every training pair fits a row")
        if d.pack_lengths[-1] > d.batch_tokens:
            raise ConfigError(f"data.pack_lengths: {d.pack_lengths[-1]} exceeds data.batch_tokens ({d.batch_tokens})")
    if t.grad_accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")
    if not d.dataset and not d.train_files:
        raise ConfigError("set data.dataset (hub name) or data.train_files (local files)")


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")

