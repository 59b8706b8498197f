"""Batching across requests: one queue, worker threads, many requests decoded together.

Requests (jobs) wait in arrival order. Each cycle the worker takes the settings of the job that
has waited longest, then lines of every waiting job with the same settings, up to a token budget:
first a line of each job in turn (up to FAIR_SHARE rounds), then more in arrival order while the
budget and `max_lines` last (the engine pads each batch to a power of two of at most max_lines
rows, so the server's program shapes are a small set compiled at start). So a long request is decoded a slice at a time and a short one that arrives behind it is
answered after one cycle, not after the whole long request. When the worker is idle it waits at
most `max_wait` seconds after the first arrival for others to join the batch. (Waiting longer
under load, for as many lines as the last cycle had, was tried: no gain, RESULTS.md.)

The decoding itself (`translate`, which sorts the lines into length-sorted batches padded to a
power of two of rows or 1.5x one, `Engine`) runs in the worker thread, off the event loop; each job collects its
own lines' results in its own order as each batch is decoded (shortest lines first) and is told
once all of them are in, not when the cycle ends, so its client can send again while the
cycle's longer lines decode. With several `workers`
(the engine's decoders, one per CPU device) each takes its own cycles from the one queue and
decodes them on its own devices while the others decode theirs.

With a `stream` (the engine's row pool, `engine.GreedyStream`; one worker), the jobs it accepts (greedy, the
server's own settings, lines that fit its rows) skip the cycles once the server holds
`stream_from` lines, until it holds only `stream_until`: the worker puts their lines into the
pool's free rows, a line of each waiting job in turn, steps the pool a few tokens, answers the
lines that finished and refills their rows (continuous batching). A cycle's batch runs until its longest line ends, which under load wastes
half its steps; the pool's rows are refilled as theirs end. Under light load a cycle is
the faster (one call for the whole batch where the pool makes one every few steps), so jobs go by
cycles then. Other jobs always go by cycles, between the pool's steps.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

FAIR_SHARE = 8  # lines of each waiting job per cycle before any job gets more


class QueueFull(Exception):
    """The queue holds as many lines as it may; the client should retry later."""


class Job:
    """One request: its lines, their costs (padded source tokens) and the key of its settings.
    `sampling` jobs are decoded alone, each slice seeded by its line numbers within the request,
    as `translate` seeds a file's lines."""

    _ids = itertools.count()

    def __init__(self, lines: Sequence[str], costs: Sequence[int], settings: Any, *, prefixes=None,
                 alignment: bool = False, sampling: bool = False, on_done: Callable[["Job"], None] | None = None,
                 source_ids: Sequence[Sequence[int]] | None = None):
        self.id = next(Job._ids)
        self.lines, self.costs, self.settings = list(lines), list(costs), settings
        self.source_ids = source_ids  # the lines' token ids, where the caller has them (a stream reads them)
        self.prefixes, self.alignment = (list(prefixes) if prefixes is not None else None), alignment
        self.key: Hashable = (settings, alignment, prefixes is not None, self.id if sampling else None)
        self.results: list = [None] * len(self.lines)
        self.next_line = 0  # lines before it are taken by the worker
        self.remaining = len(self.lines)  # lines not yet answered
        self.error: BaseException | None = None
        self.cancelled = False
        self.on_done = on_done
        self.arrived = time.monotonic()

    def waiting(self) -> int:
        return len(self.lines) - self.next_line


class Batcher:
    """The queue and its worker thread. translate(lines, settings, prefixes, alignment, first_line)
    returns one result per line (Engine.translate)."""

    def __init__(self, translate: Callable[..., list], budget: int, max_wait: float = 0.003,
                 max_queue_lines: int = 4096, hold: Callable[[], bool] | None = None, max_lines: int = 64,
                 stream=None, stream_from: int = 48, stream_until: int = 16, workers: int = 1):
        if stream is not None and workers != 1:
            raise ValueError("a stream (row pool) is stepped by the one worker thread")
        self.translate, self.budget, self.max_wait = translate, budget, max_wait
        self.stream = stream  # None, or what decodes the jobs it accepts row by row (engine.GreedyStream)
        # jobs go to the stream from `stream_from` lines in the server (queued or decoding) until
        # the load falls to `stream_until`: not back and forth around one threshold, where the
        # cycles' batches would hold up the pool's steps
        self.stream_from, self.stream_until = stream_from, stream_until
        self.streaming_load = False
        self._streamed: list[Job] = []  # the stream's jobs with lines not yet in its rows, in arrival order
        self.stream_steps = 0  # calls of stream.advance
        self.max_lines = max_lines  # lines a cycle takes at most: bounds the batch shapes (Engine.shapes)
        self.max_queue_lines = max_queue_lines
        self.hold = hold  # tests: while it returns True the worker starts no cycle
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.queued_lines = 0  # lines waiting to be taken
        self.busy_lines = 0  # lines being decoded now
        self.cycles_by_worker = [0] * workers
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"serve-batcher-{k}", daemon=True)
                         for k in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def cycles(self) -> int:
        """Cycles started so far, by every worker."""
        return sum(self.cycles_by_worker)

    def submit(self, job: Job) -> None:
        """Queues the job; QueueFull when its lines do not fit. Empty jobs finish at once."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if self.queued_lines + len(job.lines) > self.max_queue_lines and self.queued_lines:
                raise QueueFull(f"{self.queued_lines} lines are waiting (at most {self.max_queue_lines})")
            if not job.lines:
                _finish(job)
                return
            load = self.queued_lines + self.busy_lines + len(job.lines)
            if load >= self.stream_from:
                self.streaming_load = True
            elif load <= self.stream_until:
                self.streaming_load = False
            streamed = self.stream is not None and self.streaming_load and self.stream.accepts(job)
            (self._streamed if streamed else self._jobs).append(job)
            self.queued_lines += len(job.lines)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drops the job's lines not yet taken (its client has gone or timed out)."""
        with self._cond:
            job.cancelled = True
            self._dequeue(job)

    def stop(self, timeout: float | None = None) -> None:
        """Lets the workers finish what is queued, then ends them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _take(self) -> list[tuple[Job, int, int]] | None:
        """(job, first line, end line) slices of one cycle, or None when stopping with nothing queued."""
        with self._cond:
            while True:
                while not self._jobs or (self.hold is not None and self.hold()):
                    if self._stopping and not self._jobs:
                        return None
                    self._cond.wait(0.01 if self.hold is not None else None)
                deadline = self._jobs[0].arrived + self.max_wait
                while (self._jobs and sum(sum(j.costs[j.next_line:]) for j in self._jobs) < self.budget
                       and not self._stopping and sum(j.waiting() for j in self._jobs) < self.max_lines
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                if self._jobs:  # else another worker took them while this one waited for more
                    break
            key = self._jobs[0].key
            same = [j for j in self._jobs if j.key == key]
            taken = {j.id: j.next_line for j in same}
            spent = count = 0

            def fits(j: Job) -> bool:
                return (j.next_line < len(j.lines) and count < self.max_lines
                        and (spent == 0 or spent + j.costs[j.next_line] <= self.budget))

            for _ in range(FAIR_SHARE):  # a line of each job in turn, up to FAIR_SHARE each
                turn = [j for j in same if fits(j)]
                for j in turn:
                    if fits(j):
                        spent += j.costs[j.next_line]
                        count += 1
                        j.next_line += 1
                if not turn:
                    break
            for j in same:  # then whatever fits, in arrival order
                while fits(j):
                    spent += j.costs[j.next_line]
                    count += 1
                    j.next_line += 1
            slices = [(j, taken[j.id], j.next_line) for j in same if j.next_line > taken[j.id]]
            for j, start, end in slices:
                self.queued_lines -= end - start
                self.busy_lines += end - start
                if j.next_line == len(j.lines):
                    self._jobs.remove(j)
            return slices

    def _run(self, worker: int) -> None:
        while True:
            with self._cond:
                while self._held() or not (self._jobs or self._streaming()):
                    if self._stopping and not (self._jobs or self._streaming()):
                        return
                    self._cond.wait(0.01 if self.hold is not None else None)
                cycle = bool(self._jobs)
            if self._streaming():
                self._stream_step()
            if cycle:
                self._cycle(self._take(), worker)

    def _held(self) -> bool:
        return self.hold is not None and self.hold()

    def _streaming(self) -> bool:
        """True when the stream has lines waiting or rows decoding."""
        return self.stream is not None and bool(self._streamed or self.stream.active)

    def _stream_step(self) -> None:
        """Fills the stream's free rows (a line of each waiting job in turn), steps it, answers the
        lines that finished."""
        with self._cond:
            taken: list[tuple[Job, int]] = []
            free = self.stream.free()
            while free > len(taken) and self._streamed:
                for j in list(self._streamed):
                    if free == len(taken):
                        break
                    taken.append((j, j.next_line))
                    j.next_line += 1
                    if j.next_line == len(j.lines):
                        self._streamed.remove(j)
            self.queued_lines -= len(taken)
            self.busy_lines += len(taken)
        try:
            finished = self.stream.admit(taken) + self.stream.advance()
            error = None
        except Exception as e:  # noqa: BLE001 (answered to these requests; the server goes on)
            finished, error = [], e
        with self._cond:
            self.stream_steps += 1
            if error is not None:  # every line in the stream's rows is lost: their jobs fail whole
                lost = {(id(j), k): j for j, k in taken + self.stream.owners()}
                self.busy_lines -= len(lost)
                self.stream.reset()
                for j in {id(j): j for j in lost.values()}.values():
                    self._fail(j, error)
                return
            for (j, k), hyps in finished:
                self._answer(j, k, hyps)

    def _answer(self, job: Job, line: int, hyps) -> None:
        """Line `line` of the job is decoded; the job is done once all its lines are (lock held)."""
        job.results[line] = hyps
        job.remaining -= 1
        self.busy_lines -= 1
        if job.remaining == 0 and job.error is None:
            _finish(job)

    def _dequeue(self, job: Job) -> None:
        """Takes the job out of whichever queue holds it, with its lines not yet taken (lock held)."""
        for queue in (self._jobs, self._streamed):
            if job in queue:
                queue.remove(job)
                self.queued_lines -= job.waiting()

    def _fail(self, job: Job, error: BaseException) -> None:
        """The job fails whole; its lines not yet taken are dropped (call with the lock held)."""
        self._dequeue(job)
        job.next_line = len(job.lines)
        if job.error is None:
            job.error = error
            _finish(job)

    def _cycle(self, slices, worker: int) -> None:
        """Decodes one cycle's slices (with the worker's decoder), answering each job as soon as its
        lines are in: a cycle's batches run shortest lines first, and a request whose lines are done
        goes back to its client while the longer ones decode (at 8 clients 1.2x the sentences/s)."""
        if not slices:
            return
        first = slices[0][0]
        owners = [(j, n) for j, a, b in slices for n in range(a, b)]  # the job and line number of each line
        lines = [j.lines[n] for j, n in owners]
        prefixes = None if first.prefixes is None else [j.prefixes[n] for j, n in owners]
        ids = (None if any(j.source_ids is None for j, _, _ in slices)  # encoded on arrival: not again
               else [j.source_ids[n] for j, n in owners])
        answered = [False] * len(owners)

        def answer(done) -> None:
            """Hands the decoded lines [(k, hypotheses)] to their jobs; a job with all its lines in is done."""
            with self._cond:
                for k, hyps in done:
                    if not answered[k]:
                        answered[k] = True
                        self._answer(*owners[k], hyps)

        with self._cond:
            self.cycles_by_worker[worker] += 1
        try:
            results = self.translate(lines, first.settings, prefixes, first.alignment, first_line=slices[0][1] + 1,
                                     source_ids=ids, decoder=worker, on_lines=answer)
        except Exception as e:  # noqa: BLE001 (answered to these requests; the server goes on)
            with self._cond:
                failed = {id(j): j for (j, _), done in zip(owners, answered) if not done}
                self.busy_lines -= answered.count(False)
                for j in failed.values():  # the jobs still waiting for a line of this cycle fail whole
                    self._fail(j, e)
            return
        answer(list(enumerate(results)))  # the lines not answered yet (empty ones, or with alignment)


def _finish(job: Job) -> None:
    if job.on_done is not None and not job.cancelled:
        job.on_done(job)
