"""Search: the settings, the compiled program, and `Translator`, the one entry point to a
trained model.

`Translator` holds a model structure, its tokenizer and the device mesh; given parameters it
translates id lists (`translate_ids`) and text lines (`translate_lines`, `translate`), and, by
teacher forcing (teacher_forcing.py), scores given targets (`score_ids`) and reads attention
weights (`attention_weights`). Every command that uses a trained model goes through it:
translate, evaluate, score, attention, alignments, and validation BLEU during training.

Sentences are sorted by length and decoded in the small set of padded shapes that
decode_batches.py plans, so jit compiles a bounded number of programs; outputs are put back in
input order, one result per input.
"""

from __future__ import annotations

import functools
import math
import sys
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from transformer_mt import decode as decode_lib
from transformer_mt import int8_kernel
from transformer_mt import matmul
from transformer_mt import program_store
from transformer_mt import sharding
from transformer_mt import teacher_forcing
from transformer_mt import tokenizer as tok_lib
from transformer_mt.config import Config, ConfigError
from transformer_mt.decode_batches import decoding_buckets, next_power_of_two, plan_batches, row_bucket
from transformer_mt.textio import clean_line, one_line, warn
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID

MAX_LINE_WARNINGS = 10  # lines too long for the model named one by one; the rest only counted


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
    scores: bool = True  # False: greedy search may skip its log-probabilities (scores 0; same tokens)

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
    base["precision"] = matmul.resolve_precision(base["precision"], cfg.model.d_model)
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


def settings_from_args(cfg: Config, args) -> SearchSettings:
    """The settings of the `translate` and `evaluate` command lines (unset options: the config's)."""
    return settings_from(cfg, beam_size=args.beam, alpha=args.alpha, max_len_a=args.max_len_a,
                         max_len_b=args.max_len_b, batch_tokens=args.batch_tokens,
                         nbest=getattr(args, "nbest", 1), sampling=args.sampling, temperature=args.temperature,
                         seed=args.seed, precision=getattr(args, "precision", None))


def prefix_width(longest: int) -> int:
    """The padded width of a batch's target prefixes: 0, or a power of two (few program shapes)."""
    return next_power_of_two(longest) if longest else 0


def spread_rows(count: int, rows: int, devices: int) -> list[int]:
    """Rows of a batch of `rows` (split into `devices` equal runs, one per device) for its
    `count` sentences: dealt round the devices, so a part-filled batch gives each device its
    share of real rows (each searches its own rows in its own loop, which stops when they end)."""
    per = rows // devices
    return [(r % devices) * per + r // devices for r in range(count)]


_BY_IDENTITY: dict[tuple, tuple] = {}  # (id(graphdef), settings...) -> (graphdef, program)


def compiled_search(graphdef, beam_size: int, alpha: float, nbest: int, max_steps: int,
                    sampler: tuple[float, int, float] | None = None, precision: str = "float32", mesh=None,
                    scores: bool = True):
    """jit(encode + search); see _compiled_search (one cache key however the arguments are passed).

    Looked up by the graphdef's identity first: hashing a graphdef walks the whole model
    structure (3 ms on the default model), which a file of 10,000 lines paid once a batch."""
    scores = scores or beam_size > 1 or sampler is not None  # only greedy search can do without
    kernel = int8_kernel.runs(precision)  # int8 products by our kernel, or in XLA
    key = (id(graphdef), beam_size, alpha, nbest, max_steps, sampler, precision, mesh, scores, kernel)
    hit = _BY_IDENTITY.get(key)
    if hit is not None and hit[0] is graphdef:
        return hit[1]
    fn = _compiled_search(graphdef, beam_size, alpha, nbest, max_steps, sampler, precision, mesh, scores, kernel)
    if len(_BY_IDENTITY) >= 256:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[key] = (graphdef, fn)
    return fn


@functools.lru_cache(maxsize=64)
def _compiled_search(graphdef, beam_size: int, alpha: float, nbest: int, max_steps: int,
                     sampler: tuple[float, int, float] | None, precision: str, mesh=None, want_scores: bool = True,
                     kernel: bool = False):
    """jit(encode + search) for one model structure and search setting, shared by every Translator
    in the process (validation BLEU during training, then `translate`).

    The program takes (params, src [B, S], max_lens [B], prefix [B, P], prefix_lens [B], row_ids
    [B], seed); prefix (P may be 0) holds target tokens forced first; row_ids and seed give each
    sentence its own random stream when sampling (temperature, top_k, top_p = sampler): nbest
    draws per sentence, best first. precision: the matmuls' inputs (matmul.decoding_inputs);
    kernel: int8 products by int8_kernel's kernel (else in XLA, with the same numbers).
    want_scores=False: greedy search without log-probabilities (zero scores, the same tokens).

    With a mesh whose "data" axis splits the rows, each device searches its own rows in its own
    loop (shard_map): the loop stops when that device's rows are done, and no step waits for the
    other devices. A jit over the whole batch ended every step with an all-reduce of `done`
    across the devices, which on a 2-core CPU made each step wait for the slower core: 1.2-1.8x
    slower (benchmarks/RESULTS.md, 2026-12-03). Every row is computed alone, so the answers are
    the same either way.
    """

    def search(params, prepared, *batch):
        with matmul.decoding_inputs(precision), int8_kernel.decoding_model(graphdef, params, prepared,
                                                                          kernel) as model:  # read while tracing
            return _search(model, *batch)

    def _search(model, src, max_lens, prefix, prefix_lens, row_ids, seed):
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
            argmax_step = functools.partial(model.decode_argmax_step, cross=cross, banned_ids=kw["banned_ids"])
            tokens, logp = decode_lib.greedy_search(step, cache, batch_size=batch, with_scores=want_scores,
                                                    argmax_step=argmax_step, **kw)
            return tokens[:, None, :], logp[:, None]
        tokens, scores, _ = decode_lib.beam_search(step, cache, batch_size=batch, beam_size=beam_size, alpha=alpha,
                                                   nbest=nbest, reorder_cache=model.reorder_cache, **kw)
        return tokens, scores

    if mesh is not None and sharding.data_size(mesh) > 1:
        rows, whole = P(sharding.DATA), P()
        search = jax.shard_map(search, mesh=mesh, in_specs=(whole, whole, rows, rows, rows, rows, rows, whole),
                               out_specs=(rows, rows), check_vma=False)
    prepare = (int8_kernel.preparer(graphdef, None if mesh is None else sharding.replicated(mesh)) if kernel
               else int8_kernel.nothing_prepared)  # what the search reads besides the params
    return SearchProgram(jax.jit(search), (program_store.structure(graphdef), beam_size, alpha, nbest, max_steps, sampler, precision, want_scores, kernel,
                                           None if mesh is None else (mesh.devices.tolist(), mesh.axis_names)),
                         None if mesh is None else list(mesh.devices.flat), prepare)


class SearchProgram:
    """A jitted search and its compiled programs by argument shapes and shardings: kept in
    memory, loaded from the program store (program_store.py: no tracing in a new process), or
    traced, compiled and stored. Without a store (compile cache off, several processes) it is
    the jitted function. A stored program is loaded onto the mesh's own devices (one compiled
    for device 0 does not load onto device 1: its argument shardings name device 0)."""

    def __init__(self, jitted, settings_key: tuple, devices=None, prepare=None):
        self.jitted, self.settings_key = jitted, settings_key
        self.devices = devices  # the mesh's, which a stored program is loaded onto
        self.prepare = prepare  # params -> what the search reads besides them (int8_kernel.preparer)
        self.programs: dict = {}
        self._params_seen: tuple | None = None  # (weak reference to params, their signature, prepared)
        self._loaded_shapes: set = set()  # batch shapes whose programs are loaded for those params
        self.store = program_store.store_dir()

    def __call__(self, params, *batch):
        program = self.program(params, *batch)
        return (self.jitted if program is None else program)(params, *self._extra(params), *batch)

    def _extra(self, params) -> tuple:
        """The arguments between params and the batch: what `prepare` makes of the params, if any."""
        return () if self.prepare is None else (self.prepared(params),)

    def program(self, params, *batch):
        """The compiled program for these arguments (loaded or compiled now if need be), or None
        without a store."""
        if self.store is None or isinstance(batch[0], jax.core.Tracer):  # no store, or traced (make_jaxpr)
            return None
        signature = (tuple((a.shape, a.dtype.name, getattr(a, "sharding", None)) for a in batch),
                     self._params_signature(params))
        program = self.programs.get(signature)
        if program is None:
            program = program_store.load_or_compile(
                self.store, program_store.program_key(self.settings_key, signature), self.devices,
                lambda: self.jitted.lower(params, *self._extra(params), *batch))
            self.programs[signature] = program
        return program

    def _params_signature(self, params) -> tuple:
        """The params' shapes, dtypes and shardings, walked once per params object (every batch of
        a file or of a server passes the same one), not once a batch."""
        return self._seen(params)[0]

    def prepared(self, params):
        """What the search reads besides the params, made from them once per params object: the
        int8 kernel's packed weights, or nothing."""
        return self._seen(params)[1]

    def loaded(self, params, shape: tuple) -> bool:
        """True when the program of this (length, rows, width) batch shape is loaded for these
        params (Translator.load_programs: a server's cycle need not build its filler batches)."""
        seen = self._params_seen
        return seen is not None and seen[0]() is params and shape in self._loaded_shapes

    def note_loaded(self, params, shape: tuple) -> None:
        """Remembers that the program of this batch shape is loaded for these params (after a call)."""
        if self._params_seen is not None and self._params_seen[0]() is params:
            self._loaded_shapes.add(shape)

    def _seen(self, params) -> tuple:
        seen = self._params_seen
        if seen is not None and seen[0]() is params:
            return seen[1:]
        self._loaded_shapes = set()  # new params: their programs' signatures differ
        prepared = None if self.prepare is None else self.prepare(params)
        leaves = jax.tree.leaves(params)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # traced (make_jaxpr): nothing to keep
            return None, prepared
        signature = tuple((x.shape, x.dtype.name, x.sharding) for x in leaves)
        try:
            self._params_seen = (weakref.ref(params), signature, prepared)  # a new params object walks again
        except TypeError:  # a container without weak references: walked every time
            pass
        return signature, prepared


class Translator:
    """A trained model's structure, tokenizer and mesh: decodes with given params (one
    jit-compiled search per settings and shape) and runs teacher forcing over given targets."""

    def __init__(self, cfg: Config, graphdef, tok: tok_lib.Tokenizer, mesh=None):
        self.cfg, self.graphdef, self.tok = cfg, graphdef, tok
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.buckets = decoding_buckets(cfg.data.bucket_lengths)  # source lengths decoding pads to
        self.truncated = 0  # lines translate_lines cut to the largest bucket
        self.rows_for = row_bucket  # rows a batch of n sentences is padded to (plan_batches)

    def _fit(self, ids: list[int]) -> list[int]:
        """Source ids (ending in EOS) cut to the largest bucket (translate_lines warns and counts)."""
        limit = self.buckets[-1]
        if len(ids) <= limit:
            return ids
        return ids[: limit - 1] + [EOS_ID]

    # ------------------------------------------------------------------ search

    def translate_ids(self, params, sources: Sequence[list[int]], settings: SearchSettings,
                      progress: bool = False, prefixes: Sequence[list[int]] | None = None,
                      first_index: int = 0, one_bucket: bool = True,
                      on_batch: Callable[[list[int], list], None] | None = None
                      ) -> list[list[tuple[list[int], float]]]:
        """n-best (ids, score) lists for source id lists (each ending in EOS); empty sources give [].

        prefixes: target ids each output must start with (forced; the length limit grows by them).
        first_index: the first source's number in the whole input, which seeds its samples, so a
        sentence draws the same samples whatever batch or chunk it lands in.
        one_bucket: a batch holds one length bucket (plan_batches; False: a batch runs on into longer
        buckets, padded to its longest line, which benchmarks/batch_invariance.py --mixed measures).
        on_batch(indices, n-best lists): called as each batch's results are read, shortest sources
        first (a server answers those lines while the longer ones decode).
        """
        results: list[list[tuple[list[int], float]]] = [[] for _ in sources]
        sources = [self._fit(list(s)) for s in sources]
        prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in sources]
        todo = [i for i, s in enumerate(sources) if len(s) > 1]
        todo.sort(key=lambda i: len(sources[i]))
        devices = sharding.data_size(self.mesh)
        batches = plan_batches([len(sources[i]) for i in todo], self.buckets, settings.batch_tokens,
                               devices, self.rows_for, one_bucket)
        bar = tqdm(total=len(todo), disable=not progress, desc="translate", unit="sent", dynamic_ncols=True,
                   file=sys.stderr)
        widths = [prefix_width(max(len(prefixes[todo[k]]) for k in chunk)) for _, _, chunk in batches]
        self.load_programs(params, settings, {(length, rows, width) for (length, rows, _), width in zip(batches, widths)})
        pending = None  # the batch in flight: the next one is dispatched before its results are read

        def collect(chunk, places, outputs):
            tokens, scores = jax.device_get(outputs)
            for r, i in zip(places, chunk):
                results[i] = [(tok_lib.cut_at_eos(tokens[r, k]), float(scores[r, k])) for k in range(settings.nbest)]
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(chunk, [results[i] for i in chunk])

        for (length, rows, chunk), width in zip(batches, widths):
            chunk = [todo[k] for k in chunk]
            src = np.full((rows, length), PAD_ID, np.int32)
            max_lens = np.ones((rows,), np.int32)  # all-pad filler rows stop at once
            prefix = np.full((rows, width), PAD_ID, np.int32)
            prefix_lens = np.zeros((rows,), np.int32)
            row_ids = np.zeros((rows,), np.int32)
            places = spread_rows(len(chunk), rows, devices)
            for r, i in zip(places, chunk):
                src[r, : len(sources[i])] = sources[i]
                prefix[r, : len(prefixes[i])] = prefixes[i]
                prefix_lens[r] = len(prefixes[i])
                max_lens[r] = settings.max_steps(len(sources[i])) + len(prefixes[i])
                row_ids[r] = first_index + i
            fn = self.search_for(settings, length, width)
            outputs = fn(params, *self._device_args(src, max_lens, prefix, prefix_lens, row_ids, settings.seed))
            # (dispatched, not waited for)
            fn.note_loaded(params, (length, rows, width))
            if pending is not None:
                collect(*pending)
            pending = chunk, places, outputs
        if pending is not None:
            collect(*pending)
        bar.close()
        return results

    def search_for(self, settings: SearchSettings, length: int, width: int = 0) -> SearchProgram:
        """The search of batches of sources padded to `length` with prefixes padded to `width`."""
        sampler = settings.sampler_args()
        sampler = None if sampler is None else (float(settings.temperature), *sampler)
        return compiled_search(self.graphdef, settings.beam_size, float(settings.alpha), settings.nbest,
                               settings.max_steps(length) + width, sampler, settings.precision, self.mesh,
                               settings.scores)

    def _device_args(self, src, max_lens, prefix, prefix_lens, row_ids, seed: int) -> tuple:
        """A search's arguments after params, its rows split over the mesh's data axis."""
        batch = sharding.put_batch(self.mesh, {"src": src, "max_lens": max_lens, "prefix": prefix,
                                               "prefix_lens": prefix_lens, "row_ids": row_ids})
        return (batch["src"], batch["max_lens"], batch["prefix"], batch["prefix_lens"], batch["row_ids"],
                np.uint32(seed))

    def filler_batch(self, settings: SearchSettings, rows: int, length: int, width: int = 0) -> tuple:
        """A search's arguments after params for a batch of filler rows (which stop at once)."""
        return self._device_args(np.full((rows, length), PAD_ID, np.int32), np.ones((rows,), np.int32),
                                 np.full((rows, width), PAD_ID, np.int32), np.zeros((rows,), np.int32),
                                 np.zeros((rows,), np.int32), settings.seed)

    def load_programs(self, params, settings: SearchSettings, shapes) -> None:
        """Loads from the program store (or compiles) the search programs of several (length,
        rows, prefix width) batch shapes before the first batch runs, two at a time: XLA
        deserializes or compiles a program on one core, so a file's 10-20 programs are ready in
        about half the time (benchmarks/RESULTS.md, 2026-12-03). Shapes loaded before for these
        params are skipped (a server's cycles meet the same few: building their filler batches
        and a thread pool cost 17% of its batching thread, RESULTS.md). Without a store: nothing."""
        if program_store.store_dir() is None:
            return
        shapes = [s for s in sorted(shapes) if not self.search_for(settings, s[0], s[2]).loaded(params, s)]
        if len(shapes) < 2:
            return

        def load(shape):
            length, rows, width = shape
            search = self.search_for(settings, length, width)
            search.program(params, *self.filler_batch(settings, rows, length, width))
            search.note_loaded(params, shape)

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(load, shapes))

    def compile_shape(self, params, settings: SearchSettings, length: int, rows: int) -> None:
        """Compiles (or loads) the search program of a (rows, length) batch without prefixes, as
        translate_ids would meet it, by running it on filler rows (which stop at once)."""
        jax.block_until_ready(self.search_for(settings, length)(params, *self.filler_batch(settings, rows, length)))

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """The source ids of text lines, cleaned as a file's lines are (textio.clean_line)."""
        return self.tok.encode_src([clean_line(s) for s in lines])

    def translate_lines(self, params, lines: Sequence[str], settings: SearchSettings, progress: bool = False,
                        name: str = "input", first_line: int = 1, prefixes: Sequence[str] | None = None,
                        source_ids: Sequence[list[int]] | None = None, one_bucket: bool = True,
                        on_lines: Callable[[list[tuple[int, list[tuple[str, float]]]]], None] | None = None
                        ) -> list[list[tuple[str, float]]]:
        """n-best (text, score) per line; empty and whitespace-only lines give [("", 0.0)] * nbest.
        prefixes: target text each translation starts with (one per line; "" for none).
        source_ids: the lines' `encode_lines` where the caller has them already (the server, which
        costs each line on arrival). one_bucket: as translate_ids. on_lines([(k, n-best)]): called
        with each batch's lines as soon as they are decoded (the server answers them then).

        A line longer than the largest bucket is translated from its first tokens, with a warning
        naming it as line first_line + k of `name` (the first MAX_LINE_WARNINGS; `truncated`
        counts them all).
        """
        ids = source_ids if source_ids is not None else self.encode_lines(lines)
        limit = self.buckets[-1]
        for n, seq in enumerate(ids, start=first_line):
            if len(seq) > limit:
                self.truncated += 1
                if self.truncated <= MAX_LINE_WARNINGS:
                    more = " (further long lines are only counted)" if self.truncated == MAX_LINE_WARNINGS else ""
                    warn(f"{name} line {n}: {len(seq)} tokens, longer than the model's {limit}; "
                         f"translated from its first {limit - 1}{more}")
        prefix_ids = None if prefixes is None else self.tok.encode_tgt([clean_line(p) for p in prefixes])

        def texts(nbests):  # [(text, score)] of each line's n-best; one tokenizer call for them all
            pieces = iter(self.tok.decode_tgt([h[0] for hyps in nbests for h in hyps]))
            return [[(one_line(next(pieces)), s) for _, s in hyps] if hyps else [("", 0.0)] * settings.nbest
                    for hyps in nbests]

        if on_lines is None:
            return texts(self.translate_ids(params, ids, settings, progress, prefixes=prefix_ids,
                                            first_index=first_line - 1, one_bucket=one_bucket))
        out: list = [None] * len(ids)

        def on_batch(indices, nbests):
            done = list(zip(indices, texts(nbests)))
            for i, hyps in done:
                out[i] = hyps
            on_lines(done)

        results = self.translate_ids(params, ids, settings, progress, prefixes=prefix_ids, first_index=first_line - 1,
                                     one_bucket=one_bucket, on_batch=on_batch)
        return [o if o is not None else texts([hyps])[0] for o, hyps in zip(out, results)]

    def translate(self, params, sentences: Sequence[str], beam_size: int | None = None, alpha: float | None = None,
                  progress: bool = False) -> list[str]:
        """Best translation of each sentence (used for validation BLEU)."""
        settings = settings_from(self.cfg, beam_size=beam_size, alpha=alpha)
        nbest = self.translate_ids(params, self.encode_lines(sentences), settings, progress)
        return [self.tok.decode_tgt([hyps[0][0]])[0] if hyps else "" for hyps in nbest]

    # ------------------------------------------------------------------ teacher forcing

    def score_ids(self, params, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                  batch_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(total log-prob float64 [N], tokens int [N]) of each target given its source, EOS
        included (teacher_forcing.score_ids); batch_tokens defaults to training's."""
        batch_tokens = batch_tokens or self.cfg.data.batch_tokens
        if batch_tokens < 1:
            raise ConfigError("--batch-tokens must be positive")
        return teacher_forcing.score_ids(self.graphdef, params, self.mesh, self.cfg.data.bucket_lengths,
                                         batch_tokens, src_ids, tgt_ids)

    def attention_weights(self, params, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                          alignment_only: bool = False) -> list:
        """Each pair's attention weights (teacher_forcing.teacher_forced_weights)."""
        return teacher_forcing.teacher_forced_weights(self.graphdef, params, self.mesh, self.cfg.data.bucket_lengths,
                                                      self.cfg.data.batch_tokens, src_ids, tgt_ids, alignment_only)
