"""Translation of sentence lists, files and stdin with a trained run; `evaluate` on top of it.

Sentences are sorted by length and decoded in the same small set of padded shapes as training,
so jit compiles a bounded number of programs; outputs are put back in input order. Whatever the
input, the output has exactly one line per input line.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from transformer_mt import data as data_lib
from transformer_mt import decode as decode_lib
from transformer_mt import matmul
from transformer_mt import sharding
from transformer_mt import tokenizer as tok_lib
from transformer_mt.config import Config, ConfigError
from transformer_mt.rundir import load_run
from transformer_mt.textio import decode_lines, iter_line_chunks, read_lines, warn  # noqa: F401 (part of this module's API)
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class SearchSettings:
    beam_size: int
    alpha: float
    max_len_a: float
    max_len_b: int
    max_len_cap: int
    batch_tokens: int
    nbest: int = 1
    sampling: str = ""  # "" (search), "topk:K" or "topp:P"; draws nbest samples per sentence
    temperature: float = 1.0  # sampling only
    seed: int = 0  # sampling only: the same seed draws the same samples
    precision: str = "float32"  # matmul inputs: float32 (exact), bf16 or int8 (matmul.decoding_inputs)

    def sampler_args(self) -> tuple[int, float] | None:
        """(top_k, top_p) when sampling, else None."""
        if not self.sampling:
            return None
        kind, _, value = self.sampling.partition(":")
        try:
            if kind == "topk" and int(value) >= 1:
                return int(value), 1.0
            if kind == "topp" and 0.0 < float(value) <= 1.0:
                return 0, float(value)
        except ValueError:
            pass
        raise ConfigError(f"--sampling must be topk:K (K >= 1) or topp:P (0 < P <= 1), got {self.sampling!r}")

    def max_steps(self, src_len: int) -> int:
        """Output length limit for a source of src_len tokens: a * src_len + b, capped."""
        return int(max(1, min(self.max_len_cap, math.floor(self.max_len_a * src_len + self.max_len_b))))


def settings_from(cfg: Config, **overrides) -> SearchSettings:
    d = cfg.decode
    base = dict(beam_size=d.beam_size, alpha=d.alpha, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                max_len_cap=d.max_len_cap, batch_tokens=d.batch_tokens, precision=d.precision)
    base.update({k: v for k, v in overrides.items() if v is not None})
    base["precision"] = matmul.resolve_precision(base["precision"])
    s = SearchSettings(**base)
    if s.precision not in matmul.PRECISIONS:
        raise ConfigError(f"--precision must be one of auto, {', '.join(matmul.PRECISIONS)}; got {s.precision!r}")
    if s.beam_size < 1:
        raise ConfigError(f"beam size must be >= 1, got {s.beam_size}")
    if s.sampling:
        s.sampler_args()  # validates
        if s.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {s.temperature}")
        if s.nbest < 1:
            raise ConfigError(f"--nbest must be >= 1, got {s.nbest}")
    elif not 1 <= s.nbest <= s.beam_size:
        raise ConfigError(f"--nbest ({s.nbest}) must be between 1 and the beam size ({s.beam_size})")
    if s.batch_tokens < 1:
        raise ConfigError("--batch-tokens must be positive")
    return s


def compiled_search(graphdef, beam_size: int, alpha: float, nbest: int, max_steps: int,
                    sampler: tuple[float, int, float] | None = None, precision: str = "float32"):
    """jit(encode + search); see _compiled_search (one cache key however the arguments are passed)."""
    return _compiled_search(graphdef, beam_size, alpha, nbest, max_steps, sampler, precision)


@functools.lru_cache(maxsize=64)
def _compiled_search(graphdef, beam_size: int, alpha: float, nbest: int, max_steps: int,
                     sampler: tuple[float, int, float] | None, precision: str):
    """jit(encode + search) for one model structure and search setting, shared by every Translator
    in the process (validation BLEU during training, then `translate`).

    The program takes (params, src [B, S], max_lens [B], prefix [B, P], prefix_lens [B], row_ids
    [B], seed); prefix (P may be 0) holds target tokens forced first; row_ids and seed give each
    sentence its own random stream when sampling (temperature, top_k, top_p = sampler): nbest
    draws per sentence, best first. precision: the matmuls' inputs (matmul.decoding_inputs).
    """

    def search(*args):
        with matmul.decoding_inputs(precision):  # read while tracing
            return _search(*args)

    def _search(params, src, max_lens, prefix, prefix_lens, row_ids, seed):
        model = nnx.merge(graphdef, params)
        prefix = prefix if prefix.shape[1] else None
        if sampler is not None:  # nbest independent draws: one row each
            src, max_lens, prefix_lens, prefix = (None if x is None else jnp.repeat(x, nbest, axis=0)
                                                  for x in (src, max_lens, prefix_lens, prefix))
            base = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_ids)
            keys = jax.vmap(jax.random.fold_in)(jnp.repeat(base, nbest), jnp.tile(jnp.arange(nbest), row_ids.shape[0]))
        encoded, src_mask = model.encode(src)  # [B, S, D], [B, S]
        cross = model.cross_state(encoded, src_mask)  # once per sentence, shared by its beams
        batch = src.shape[0]
        cache = model.init_cache(batch, beam_size if sampler is None else 1, max_steps)
        step = functools.partial(model.decode_step, cross=cross)
        kw = dict(max_steps=max_steps, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_lens=max_lens,
                  prefix=prefix, prefix_lens=prefix_lens, banned_ids=(PAD_ID, BOS_ID))  # never valid output
        if sampler is not None:
            tokens, scores = decode_lib.greedy_search(step, cache, batch_size=batch, sampler=decode_lib.make_sampler(
                *sampler), keys=jax.random.key_data(keys), **kw)
            tokens, scores = tokens.reshape(-1, nbest, max_steps), scores.reshape(-1, nbest)
            scores, order = jax.lax.top_k(scores, nbest)  # best draw first
            return jnp.take_along_axis(tokens, order[:, :, None], axis=1), scores
        if beam_size == 1:
            tokens, scores = decode_lib.greedy_search(step, cache, batch_size=batch, **kw)
            return tokens[:, None, :], scores[:, None]
        tokens, scores, _ = decode_lib.beam_search(step, cache, batch_size=batch, beam_size=beam_size, alpha=alpha,
                                                   nbest=nbest, reorder_cache=model.reorder_cache, **kw)
        return tokens, scores

    return jax.jit(search)


class Translator:
    """Decodes token ids with a model's params; one jit-compiled search per (settings, shape)."""

    def __init__(self, cfg: Config, graphdef, tok: tok_lib.Tokenizer, mesh=None):
        self.cfg, self.graphdef, self.tok = cfg, graphdef, tok
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.buckets = tuple(cfg.data.bucket_lengths)
        self.truncated = 0

    def _fit(self, ids: list[int]) -> list[int]:
        """Source ids (ending in EOS) cut to the largest bucket (translate_lines warns and counts)."""
        limit = self.buckets[-1]
        if len(ids) <= limit:
            return ids
        return ids[: limit - 1] + [EOS_ID]

    def translate_ids(self, params, sources: Sequence[list[int]], settings: SearchSettings,
                      progress: bool = False, prefixes: Sequence[list[int]] | None = None,
                      first_index: int = 0) -> list[list[tuple[list[int], float]]]:
        """n-best (ids, score) lists for source id lists (each ending in EOS); empty sources give [].

        prefixes: target ids each output must start with (forced; the length limit grows by them).
        first_index: the first source's number in the whole input, which seeds its samples, so a
        sentence draws the same samples whatever batch or chunk it lands in.
        """
        results: list[list[tuple[list[int], float]]] = [[] for _ in sources]
        sources = [self._fit(list(s)) for s in sources]
        prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in sources]
        todo = [i for i, s in enumerate(sources) if len(s) > 1]
        todo.sort(key=lambda i: len(sources[i]))
        batches = plan_batches([len(sources[i]) for i in todo], self.buckets, settings.batch_tokens,
                               sharding.data_size(self.mesh))
        sampler = settings.sampler_args()
        sampler = None if sampler is None else (float(settings.temperature), *sampler)
        bar = tqdm(total=len(todo), disable=not progress, desc="translate", unit="sent", dynamic_ncols=True,
                   file=sys.stderr)
        for length, rows, chunk in batches:
            chunk = [todo[k] for k in chunk]
            longest_prefix = max(len(prefixes[i]) for i in chunk)
            width = _next_power_of_two(longest_prefix) if longest_prefix else 0  # few program shapes
            src = np.full((rows, length), PAD_ID, np.int32)
            max_lens = np.ones((rows,), np.int32)  # all-pad filler rows stop at once
            prefix = np.full((rows, width), PAD_ID, np.int32)
            prefix_lens = np.zeros((rows,), np.int32)
            row_ids = np.zeros((rows,), np.int32)
            for r, i in enumerate(chunk):
                src[r, : len(sources[i])] = sources[i]
                prefix[r, : len(prefixes[i])] = prefixes[i]
                prefix_lens[r] = len(prefixes[i])
                max_lens[r] = settings.max_steps(len(sources[i])) + len(prefixes[i])
                row_ids[r] = first_index + i
            max_steps = settings.max_steps(length) + width
            fn = compiled_search(self.graphdef, settings.beam_size, float(settings.alpha), settings.nbest, max_steps,
                                 sampler, settings.precision)
            batch = sharding.put_batch(self.mesh, {"src": src, "max_lens": max_lens, "prefix": prefix,
                                                   "prefix_lens": prefix_lens, "row_ids": row_ids})
            tokens, scores = jax.device_get(fn(params, batch["src"], batch["max_lens"], batch["prefix"],
                                               batch["prefix_lens"], batch["row_ids"], np.uint32(settings.seed)))
            for r, i in enumerate(chunk):
                results[i] = [(_cut(tokens[r, k]), float(scores[r, k])) for k in range(settings.nbest)]
            bar.update(len(chunk))
        bar.close()
        return results

    def translate(self, params, sentences: Sequence[str], beam_size: int | None = None, alpha: float | None = None,
                  progress: bool = False) -> list[str]:
        """Best translation of each sentence (used for validation BLEU)."""
        settings = settings_from(self.cfg, beam_size=beam_size, alpha=alpha)
        ids = self.tok.encode_src([clean_line(s) for s in sentences])
        nbest = self.translate_ids(params, ids, settings, progress)
        return [self.tok.decode_tgt([hyps[0][0]])[0] if hyps else "" for hyps in nbest]


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_bucket(n: int) -> int:
    """Rows for n sentences: up to 16, the next of 1, 2, 3, 4, 6, 8, 12, 16; above, the next
    multiple of 8. At most a third of a batch is padding, and at most 7 rows of it in a large
    batch (the coarser 24, 32, 48, 64, ... ladder wasted up to a third of the work of a file's
    last, partial batch). A file's full batches share one row count, so the programs stay few."""
    if n > 16:
        return -(-n // 8) * 8
    p = _next_power_of_two(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], batch_tokens: int,
                 row_multiple: int = 1) -> list[tuple[int, int, list[int]]]:
    """Splits length-sorted sentences (each within the largest bucket, as `Translator._fit` cuts
    them) into (source length, rows, positions in `lengths`) batches.

    A batch takes the next sentences while their padded source tokens (count x the bucket of its
    longest) stay within batch_tokens. Its rows are the sentence count rounded up by `row_bucket`
    (and to a multiple of the data-parallel size), so a small input is not decoded at the size of
    a full batch, at most a third of a batch is padding, and the compiled shapes stay few: a
    file's full batches of one bucket share a shape.
    """
    batches, start = [], 0
    while start < len(lengths):
        end, length = start + 1, data_lib.bucket_for(lengths[start], buckets)
        while end < len(lengths):
            longer = data_lib.bucket_for(lengths[end], buckets)
            if (end + 1 - start) * longer > batch_tokens:
                break
            end, length = end + 1, longer
        rows = row_bucket(end - start)
        rows = -(-rows // row_multiple) * row_multiple
        batches.append((length, rows, list(range(start, end))))
        start = end
    return batches


def _cut(seq) -> list[int]:
    """Ids up to (not including) the first EOS."""
    out = []
    for t in seq:
        t = int(t)
        if t == EOS_ID:
            break
        if t not in (PAD_ID, BOS_ID):
            out.append(t)
    return out


# ----------------------------------------------------------------------------- hostile text

_LINE_BREAKS = {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def clean_line(text: str) -> str:
    """Control characters, tabs and in-line breaks become spaces; whitespace is trimmed."""
    if text.isprintable():
        return text.strip()
    return "".join(" " if (c in _LINE_BREAKS or unicodedata.category(c) == "Cc") else c for c in text).strip()


def one_line(text: str) -> str:
    """Output text that can never add a line: every line-break character becomes a space."""
    if any(c in _LINE_BREAKS for c in text):
        text = "".join(" " if c in _LINE_BREAKS else c for c in text)
    return text


# ----------------------------------------------------------------------------- commands


def _settings_from_args(cfg: Config, args) -> SearchSettings:
    return settings_from(cfg, beam_size=args.beam, alpha=args.alpha, max_len_a=args.max_len_a,
                         max_len_b=args.max_len_b, batch_tokens=args.batch_tokens,
                         nbest=getattr(args, "nbest", 1), sampling=args.sampling, temperature=args.temperature,
                         seed=args.seed, precision=getattr(args, "precision", None))


MAX_LINE_WARNINGS = 10


def translate_lines(translator: Translator, params, lines: Sequence[str], settings: SearchSettings,
                    progress: bool, name: str = "input", first_line: int = 1,
                    prefixes: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
    """n-best (text, score) per line; empty and whitespace-only lines give [("", 0.0)].
    prefixes: target text each translation starts with (one per line; "" for none).

    A line longer than the largest bucket is translated from its first tokens, with a warning
    naming it (the first MAX_LINE_WARNINGS; `translator.truncated` counts them all).
    """
    cleaned = [clean_line(s) for s in lines]
    ids = translator.tok.encode_src(cleaned)
    limit = translator.buckets[-1]
    for n, seq in enumerate(ids, start=first_line):
        if len(seq) > limit:
            translator.truncated += 1
            if translator.truncated <= MAX_LINE_WARNINGS:
                more = " (further long lines are only counted)" if translator.truncated == MAX_LINE_WARNINGS else ""
                warn(f"{name} line {n}: {len(seq)} tokens, longer than the model's {limit}; "
                     f"translated from its first {limit - 1}{more}")
    prefix_ids = None if prefixes is None else translator.tok.encode_tgt([clean_line(p) for p in prefixes])
    results = translator.translate_ids(params, ids, settings, progress, prefixes=prefix_ids,
                                       first_index=first_line - 1)
    out = []
    for hyps in results:
        if not hyps:
            out.append([("", 0.0)] * settings.nbest)
            continue
        texts = translator.tok.decode_tgt([h[0] for h in hyps])
        out.append([(one_line(t), s) for t, (_, s) in zip(texts, hyps)])
    return out


def _format(index: int, hyps: list[tuple[str, float]], nbest: int, alignments: list[str] | None = None) -> list[str]:
    """The output lines of one input line; with alignments, each line ends in ' ||| ' + its alignment."""
    lines = [hyps[0][0]] if nbest == 1 else [f"{index} ||| {text} ||| {score:.4f}" for text, score in hyps]
    if alignments is not None:
        lines = [f"{line} ||| {a}" for line, a in zip(lines, alignments)]
    return lines


def translate_command(args) -> int:
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
    translator = Translator(cfg, graphdef, tok, mesh)
    n_lines = translate_stream(translator, params, _settings_from_args(cfg, args), args.input, args.output,
                               args.buffer_lines, progress=not args.no_progress, prefix=args.prefix,
                               alignment=args.alignment)
    devices = translator.mesh.devices.flat
    print(f"translated {n_lines} line(s) with checkpoint step {step} on {len(devices)} {devices[0].platform} "
          "device(s)", file=sys.stderr)
    return 0


FILE_CHUNK_LINES = 20000  # lines of a file sorted and decoded together: plenty to fill every batch


def translate_stream(translator: Translator, params, settings: SearchSettings, input: str, output: str,
                     buffer_lines: int = 0, progress: bool = False, prefix: str | None = None,
                     alignment: bool = False) -> int:
    """Translates file or stdin ('-') `input` into `output`; returns the number of input lines.

    The input is read and translated in chunks of buffer_lines (default: one line from a
    terminal, 2000 from a pipe, FILE_CHUNK_LINES from a file), so memory stays bounded whatever
    its length and a pipe gets its lines back as it goes. Each chunk is sorted by length inside
    and written back in input order. A file output is written to a temporary file and renamed
    once every line is translated, so a failed run never leaves half a file. `prefix` names a
    file of target prefixes read in step with the input (same number of lines). `alignment` appends
    each hypothesis' word alignment (alignment.py).
    """
    from transformer_mt.alignment import align_hypotheses  # imports this module

    translator.truncated = 0
    if not buffer_lines:
        buffer_lines = FILE_CHUNK_LINES if input != "-" else (1 if sys.stdin.isatty() else 2000)
    name = "stdin" if input == "-" else input
    n_lines = 0
    chunks = iter_line_chunks(input, buffer_lines)
    head = next(chunks, None)  # a missing or unreadable input fails here, before any output exists
    with open_output(output) as out:
        bar = tqdm(disable=not progress, desc="translate", unit="line", dynamic_ncols=True, file=sys.stderr)
        prefix_chunks = iter_line_chunks(prefix, buffer_lines) if prefix else None
        for first, lines in itertools.chain([head] if head else [], chunks):
            prefixes = None
            if prefix_chunks is not None:
                prefixes = next(prefix_chunks, (first, []))[1]
                if len(prefixes) != len(lines):
                    raise ConfigError(f"--prefix {prefix} has fewer lines than {name} (line {first + len(prefixes)})")
            results = translate_lines(translator, params, lines, settings, progress=False, name=name,
                                      first_line=first, prefixes=prefixes)
            aligned = align_hypotheses(translator, params, lines, results) if alignment else [None] * len(results)
            out.write("".join("\n".join(_format(n_lines + k, hyps, settings.nbest, aligned[k])) + "\n"
                              for k, hyps in enumerate(results)))
            out.flush()
            n_lines += len(lines)
            bar.update(len(lines))
        bar.close()
        if prefix_chunks is not None and next(prefix_chunks, None) is not None:
            raise ConfigError(f"--prefix {prefix} has more lines than {name} ({n_lines})")
    if translator.truncated:
        warn(f"{translator.truncated} of {n_lines} line(s) were longer than {translator.buckets[-1]} tokens "
             "and translated from their beginning (raise data.bucket_lengths in training for longer inputs)")
    return n_lines


@contextlib.contextmanager
def open_output(path: str):
    """stdout, or a temporary file beside `path` renamed onto it when the block ends without error."""
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        f = open(tmp, "w", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write output {path}: {e.strerror or e}") from None
    try:
        with f:
            yield f
        tmp.replace(target)
    except OSError as e:
        raise ConfigError(f"cannot write output {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str, text: str) -> None:
    """Writes to stdout, or atomically to a file (see open_output)."""
    with open_output(path) as out:
        out.write(text)
        out.flush()


def evaluate_command(args) -> int:
    from transformer_mt.metrics import corpus_scores

    refs = read_lines(args.ref)
    if args.hyp:
        if args.checkpoint or args.src:
            raise ConfigError("give either --hyp, or --checkpoint with --src, not both")
        hyps = read_lines(args.hyp)
        hyp_name = args.hyp
    elif args.checkpoint and args.src:
        cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
        translator = Translator(cfg, graphdef, tok, mesh)
        sources = read_lines(args.src)
        if len(sources) != len(refs):
            raise ConfigError(f"{args.src} has {len(sources)} lines but {args.ref} has {len(refs)}")
        settings = _settings_from_args(cfg, args)
        hyps = [h[0][0] for h in translate_lines(translator, params, sources, settings, not args.no_progress,
                                                 name=args.src)]
        if args.output:
            write_text(args.output, "".join(h + "\n" for h in hyps))
        hyp_name = f"{args.checkpoint} (step {step})"
    else:
        raise ConfigError("evaluate needs --hyp FILE, or --checkpoint RUN_DIR with --src FILE")
    if len(hyps) != len(refs):
        raise ConfigError(f"{hyp_name} has {len(hyps)} lines but {args.ref} has {len(refs)}")
    scores = corpus_scores(hyps, refs)
    if args.json:
        print(json.dumps({"hyp": hyp_name, "ref": args.ref, "lines": len(refs), **scores}))
    else:
        print(f"BLEU = {scores['bleu']:.2f}  {scores['bleu_signature']}")
        print(f"chrF = {scores['chrf']:.2f}  {scores['chrf_signature']}")
    return 0


