"""The server's model: a run loaded once, and the only place the server calls the Translator API.

Everything the HTTP side needs (languages, search settings, translation of a list of lines,
attention weights, the count of compiled programs) goes through `Engine`, so a change to the
translation modules touches this file only. Lines are translated exactly as `transformer-mt
translate` translates the lines of a file: the same cleaning, the same search, the same output
text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Sequence

import jax

from transformer_mt import data as data_lib
from transformer_mt.alignment import align_hypotheses
from transformer_mt.decode_batches import next_power_of_two
from transformer_mt import program_store, sharding
from transformer_mt.rowpool import RowPool
from transformer_mt.rundir import load_run
from transformer_mt.search import SearchSettings, Translator, settings_from
from transformer_mt.textio import one_line


@dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float
    alignment: str | None = None  # 'i-j ...' when asked for


class ProgramCounter:
    """Counts the XLA programs this process compiled or loaded (from the persistent compile cache
    or the program store): after warm-up the count must stay put (a new shape means a compile in
    the middle of serving)."""

    EVENT = "/jax/core/compile/backend_compile_duration"  # a compile or a load from the cache
    CACHE_HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.count = 0
        self.from_cache = 0  # of count, loaded from the persistent compile cache
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        jax.monitoring.register_event_listener(self._on_hit)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            with self._lock:
                self.count += 1

    def _on_hit(self, event: str, **_) -> None:
        if event == self.CACHE_HIT:
            with self._lock:
                self.from_cache += 1
        elif event == program_store.LOAD_EVENT:  # read whole from the program store: no compile event
            with self._lock:
                self.count += 1
                self.from_cache += 1


MAX_ROWS = 64  # lines one batching cycle decodes at most (Batcher.max_lines): the largest row count
# padded source tokens x hypotheses a line (beam or nbest draws) in one search loop of a cycle: a
# cycle's random lengths run a loop until its longest line ends, so smaller loops of length-sorted
# lines finish sooner (beam 4 1.3-1.8x the sentences/s of one loop a bucket at 32-64 clients, greedy
# level; RESULTS.md)
BATCH_HYPOTHESIS_TOKENS = 512
POOL_ROWS = 64  # rows of the greedy row pool (GreedyStream); a step runs only as many as are busy
POOL_LENGTH = 32  # source tokens a line may have to be decoded in the row pool (longer: by cycles)
POOL_CHUNK = 8  # greedy steps between two refills of the pool's rows


def rows_for(n: int, multiple: int) -> int:
    """Rows the server pads a batch of n sentences to: the next of 2, 3, 4, 6, 8, 12, 16, 24, 32,
    48, 64 (powers of two and 1.5x them; and a multiple of the data-parallel size). Padding rows
    are decoded like the others: a cycle's 9 lines of a bucket ran on 16 rows and now on 12
    (greedy 1.06-1.15x the sentences/s at 8-64 clients, beam 4 1.1-1.4x, for ~400 MiB more of
    compiled programs; benchmarks/RESULTS.md). Coarser than `translate`'s ladder above 16 rows, so
    the server's shapes stay a set small enough to compile at start, and no load meets a shape
    after warm-up. At least 2 rows a device: on CPU a batch of 1 row a device gave test_2016 line
    556 another greedy translation than any larger batch (its sums differ in the last bits, and a
    near-tie flips)."""
    rows = next_power_of_two(n)
    if rows >= 4 and 3 * rows // 4 >= n:
        rows = 3 * rows // 4
    return -(-max(rows, 2 * multiple) // multiple) * multiple


@dataclass
class Decoder:
    """What one batching worker decodes with: a Translator over its devices and the params on them."""
    translator: Translator
    params: object


def on_device(x, device):
    """The copy of replicated array x that lives on `device` (its own buffer: nothing is copied)."""
    return next(shard.data for shard in x.addressable_shards if shard.device == device)


class Engine:
    """A trained run, ready to translate lines with any search settings the run allows.

    `decoders`: on a CPU split into several devices (sharding.split_cpu), one per device, each
    decoding its own batching cycles (Batcher workers) while the others decode theirs, rather than
    every cycle split across all of them: a device then never waits for the other's longest line
    nor for the next cycle to be taken. On 2 cores: beam 4 1.1-1.4x the sentences/s at 32-64
    clients, greedy level, and under light load the same rate for 0.65-0.85x the CPU; each
    decoder holds its own compiled programs (+0.4 GB; benchmarks/RESULTS.md). Elsewhere (an
    accelerator, one device, several hosts, or per_device off) one decoder over the whole mesh."""

    def __init__(self, run_dir: str, step: int | None = None, last: bool = False, precision: str | None = None,
                 per_device: bool = True):
        self.programs = ProgramCounter()
        self.precision = precision  # decoding precision for every request (None: the run's)
        cfg, graphdef, params, tok, step, mesh = load_run(run_dir, step, last)
        self.cfg, self.params, self.step = cfg, params, step
        self.translator = Translator(cfg, graphdef, tok, mesh)
        self.src_lang, self.tgt_lang = cfg.data.src_lang, cfg.data.tgt_lang
        self.default_beam = cfg.decode.beam_size
        self.devices = len(mesh.devices.flat)
        multiple = sharding.data_size(mesh)
        self.row_multiple = multiple
        self.translator.rows_for = lambda n: rows_for(n, multiple)
        self.decoders = self._decoders(per_device)
        self.max_rows = MAX_ROWS
        self.warm_total = self.warm_done = 0  # shapes the warm-up compiles; those done
        self.warm_error: BaseException | None = None
        self._stop_warm = threading.Event()
        self._warm_thread: threading.Thread | None = None

    def _decoders(self, per_device: bool) -> list[Decoder]:
        devices = list(self.translator.mesh.devices.flat)
        if not per_device or len(devices) < 2 or devices[0].platform != "cpu" or jax.process_count() > 1:
            return [Decoder(self.translator, self.params)]
        decoders = []
        for device in devices:
            t = self.translator
            translator = Translator(self.cfg, t.graphdef, t.tok, sharding.make_mesh([device]))
            translator.rows_for = lambda n: rows_for(n, 1)
            decoders.append(Decoder(translator, jax.tree.map(lambda x: on_device(x, device), self.params)))
        return decoders

    def settings(self, **overrides) -> SearchSettings:
        """Search settings from the run's config with overrides (None = default); ConfigError when
        invalid. A cycle's lines are decoded in batches of at most BATCH_HYPOTHESIS_TOKENS padded
        source tokens x hypotheses (the same answers: a line's do not depend on its batch's rows)."""
        if self.precision is not None and overrides.get("precision") is None:
            overrides["precision"] = self.precision
        s = settings_from(self.cfg, **overrides)
        hypotheses = s.nbest if s.sampling else s.beam_size
        return replace(s, batch_tokens=min(s.batch_tokens, max(1, BATCH_HYPOTHESIS_TOKENS // hypotheses)))

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """The lines' source token ids, cleaned as `translate` cleans a file's lines."""
        return self.translator.encode_lines(lines)

    def padded_tokens(self, ids: Sequence[Sequence[int]]) -> list[int]:
        """Source tokens each line (its ids, `encode`) costs in a decoding batch: its length
        rounded up to its bucket (0 for an empty line, which is not decoded)."""
        buckets = self.translator.buckets
        return [0 if len(x) <= 1 else data_lib.bucket_for(min(len(x), buckets[-1]), buckets) for x in ids]

    def translate(self, lines: Sequence[str], settings: SearchSettings, prefixes: Sequence[str] | None = None,
                  alignment: bool = False, first_line: int = 1,
                  source_ids: Sequence[list[int]] | None = None, decoder: int = 0,
                  on_lines: Callable[[list[tuple[int, list[Hypothesis]]]], None] | None = None
                  ) -> list[list[Hypothesis]]:
        """settings.nbest hypotheses per line, best first, as `translate` writes them for these lines
        of a file whose first line is number first_line (which seeds sampling). source_ids: the
        lines' `encode` where the caller has it (not encoded again). decoder: which of `decoders`.
        on_lines([(k, hypotheses)]): called as each batch of lines is decoded, shorter lines first,
        so that their requests are answered while the longer ones decode (without alignment, which
        is computed over all the lines at the end)."""
        # A search loop a length bucket, as `translate` batches a file: a line is padded to its own
        # bucket whatever shares its cycle, so its answer is the file's (one loop a cycle, padded to
        # its longest line, moved 2-4 int8 lines in 1,000: XLA's dots sum differently by shape).
        d = self.decoders[decoder]
        early = None if on_lines is None or alignment else (
            lambda done: on_lines([(k, [Hypothesis(text, score) for text, score in hyps]) for k, hyps in done]))
        results = d.translator.translate_lines(d.params, lines, settings, name="request", first_line=first_line,
                                               prefixes=prefixes, source_ids=source_ids, on_lines=early)
        aligned = align_hypotheses(self.translator, self.params, lines, results) if alignment else None
        return [[Hypothesis(text, score, aligned[k][h] if aligned else None) for h, (text, score) in enumerate(hyps)]
                for k, hyps in enumerate(results)]

    def attention(self, source: str, translation: str) -> dict:
        """The last decoder layer's cross-attention (mean over heads) of the pair, as pieces and rows:
        {"source": pieces + </s>, "target": pieces + </s>, "weights": [target][source]}."""
        tok = self.translator.tok
        src_ids = self.encode([source])[0]
        tgt_ids = tok.encode_tgt([translation])[0]
        if len(src_ids) <= 1 or not tgt_ids:
            return {"source": [], "target": [], "weights": []}
        weights = self.translator.attention_weights(self.params, [src_ids], [tgt_ids], alignment_only=True)[0]
        return {"source": [tok.src.id_to_piece(i) for i in src_ids[:-1]] + ["</s>"],
                "target": [tok.tgt.id_to_piece(i) for i in tgt_ids] + ["</s>"],
                "weights": [[round(float(w), 4) for w in row] for row in weights]}

    def shapes(self, settings: SearchSettings) -> list[tuple[int, int]]:
        """Every (rows, source length) batch the server can decode with these settings (without
        prefixes): each length bucket x the row counts of 1..max_rows lines, within the token
        budget that plan_batches keeps. The same for every decoder (each has as many devices)."""
        out, translator = set(), self.decoders[0].translator
        for length in translator.buckets:
            lines = max(1, min(self.max_rows, settings.batch_tokens // length))
            out.update((translator.rows_for(n), length) for n in range(1, lines + 1))
        return sorted(out)

    def warm_up(self, settings: Sequence[SearchSettings], stream: "GreedyStream | None" = None) -> None:
        """Compiles (or loads from the compile cache) the stream's row pool, then every shape of
        `shapes` for these settings on every decoder, small batches first (what light load meets);
        warm_done counts them. Runs in a background thread at start, so the server answers
        (compiling what it meets) while it warms."""
        shapes = sorted({(rows, length, s) for s in settings for rows, length in self.shapes(s)},
                        key=lambda t: (t[0], settings.index(t[2]), t[1]))
        todo = [(rows, length, s, d) for rows, length, s in shapes for d in self.decoders]
        self.warm_total = len(todo) + (stream is not None)
        try:
            if stream is not None:
                stream.start()
                self.warm_done += 1
            for rows, length, s, d in todo:
                if self._stop_warm.is_set():
                    return
                d.translator.compile_shape(d.params, s, length, rows)
                self.warm_done += 1
        except Exception as e:  # noqa: BLE001 (reported by /health; serving goes on, compiling on demand)
            self.warm_error = e

    def start_warm_up(self, settings: Sequence[SearchSettings], stream: "GreedyStream | None" = None
                      ) -> threading.Thread:
        self.warm_total = 1  # warming from now on, until warm_up has counted and compiled the shapes
        self._warm_thread = threading.Thread(target=self.warm_up, args=(list(settings), stream),
                                             name="serve-warm-up", daemon=True)
        self._warm_thread.start()
        return self._warm_thread

    def stop_warm_up(self) -> None:
        """Ends the warm-up after the shape it is compiling: a process that exits while XLA compiles
        in another thread aborts (exit -6) instead of exiting 0."""
        self._stop_warm.set()
        if self._warm_thread is not None:
            self._warm_thread.join()

    @property
    def warming(self) -> bool:
        return self.warm_error is None and self.warm_done < self.warm_total


class GreedyStream:
    """The engine's greedy row pool (rowpool.RowPool) as the batcher meets it: which jobs it
    takes (greedy with the server's settings, no prefix, no alignment, every line within
    POOL_LENGTH source tokens), lines in, hypotheses out (the text `translate` writes). Takes no
    job until `start` has compiled (or loaded) the pool's programs; until then they go by cycles."""

    def __init__(self, engine: Engine, rows: int = POOL_ROWS, length: int = POOL_LENGTH, chunk: int = POOL_CHUNK):
        self.engine = engine
        self.settings = engine.settings(beam_size=1)
        self.length = min(length, engine.translator.buckets[-1])
        multiple = engine.row_multiple
        self.rows, self.chunk = -(-rows // multiple) * multiple, chunk
        self.pool: RowPool | None = None

    def start(self) -> None:
        """Builds the pool and compiles its programs (the warm-up thread); jobs are taken after."""
        e = self.engine
        pool = RowPool(e.translator.graphdef, e.params, e.translator.mesh, self.settings, self.rows, self.length,
                       self.chunk)
        pool.warm_up()
        self.pool = pool

    def accepts(self, job) -> bool:
        return (self.pool is not None and job.key == (self.settings, False, False, None)
                and job.source_ids is not None and all(len(ids) <= self.length for ids in job.source_ids))

    @property
    def active(self) -> int:
        return 0 if self.pool is None else self.pool.active

    def free(self) -> int:
        return self.pool.free()

    def owners(self) -> list:
        return [key for key in self.pool.owner if key is not None]

    def reset(self) -> None:
        self.pool.reset()

    def admit(self, lines: Sequence[tuple]) -> list[tuple[tuple, list[Hypothesis]]]:
        """Puts each (job, line number) into a free row; empty lines are answered at once."""
        empty = [(key, [Hypothesis("", 0.0)]) for key in lines if len(key[0].source_ids[key[1]]) <= 1]
        todo = [(key, key[0].source_ids[key[1]]) for key in lines if len(key[0].source_ids[key[1]]) > 1]
        if todo:
            self.pool.admit(todo)
        return empty

    def advance(self) -> list[tuple[tuple, list[Hypothesis]]]:
        """Steps the pool; ((job, line number), [its hypothesis]) of the lines that finished."""
        finished = self.pool.advance()
        texts = self.engine.translator.tok.decode_tgt([ids for _, ids, _ in finished])
        return [(key, [Hypothesis(one_line(text), score)]) for (key, _, score), text in zip(finished, texts)]
