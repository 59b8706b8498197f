"""`transformer-mt serve`: batching across requests, the APIs, bad requests, SIGTERM, the web page.

In-process tests drive the Starlette app through httpx's ASGI transport (the batcher's worker
thread is real); the SIGTERM and browser tests run the real command on localhost. Where a test
needs requests to be queued together, the batcher is held (its `hold` hook) until they all are,
so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from conftest import ROOT  # noqa: E402
from transformer_mt import data as data_lib  # noqa: E402
from transformer_mt import search as tr  # noqa: E402
from transformer_mt import textio  # noqa: E402
from transformer_mt.serve.app import Server, create_app  # noqa: E402
from transformer_mt.serve.batcher import Batcher  # noqa: E402
from transformer_mt.serve.engine import Engine  # noqa: E402
from transformer_mt.serve.fields import Limits  # noqa: E402

LINES = [
    "A man is riding a bike .",
    "Two dogs play in the snow .",
    "Kids .",
    "A woman in a red dress is walking down the street .",
    "",
    "A boy jumps into the water .",
    "People are standing outside a building .",
]


@pytest.fixture(scope="module")
def engine(trained_run):
    return Engine(str(trained_run))


class Gate:
    """The batcher's hold hook: closed, the worker starts no batch."""

    def __init__(self):
        self.closed = False

    def __call__(self) -> bool:
        return self.closed


def make_server(engine, gate=None, **limits) -> Server:
    batcher = Batcher(engine.translate, engine.cfg.decode.batch_tokens, max_wait=0.0,
                      max_queue_lines=limits.get("max_queue_lines", 2000), hold=gate)
    limits.setdefault("timeout", 600.0)  # a first compile on a loaded machine may take long
    return Server(engine, batcher, Limits(**limits))


def run(coro):
    return asyncio.run(coro)


async def _client_calls(server: Server, calls, gate: Gate | None = None, queued_lines: int | None = None):
    """Sends (path, json) calls concurrently; with a gate, opens it once `queued_lines` lines wait."""
    transport = httpx.ASGITransport(app=create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
        tasks = [asyncio.create_task(client.post(path, json=body)) for path, body in calls]
        if gate is not None:
            while server.batcher.queued_lines < queued_lines and not all(t.done() for t in tasks):
                await asyncio.sleep(0.001)  # yields to the handlers until all have queued their lines
            gate.closed = False
        return await asyncio.gather(*tasks)


def test_concurrent_requests_get_their_own_translations(engine, monkeypatch):
    """Requests of different lengths and settings, queued together, each get what Translator gives
    for their lines alone: greedy and beam 4, n-best with scores. Each line is tokenized once, on
    arrival (its cost): the batcher hands those ids to the search."""
    encoded = []
    real_encode = engine.translator.tok.encode_src
    monkeypatch.setattr(engine.translator.tok, "encode_src", lambda lines: encoded.extend(lines) or real_encode(lines))
    gate = Gate()
    gate.closed = True
    server = make_server(engine, gate)
    requests = []
    for k in range(12):
        lines = LINES[k % 6: k % 6 + 1 + k % 3]  # 1-3 lines; one holds an empty line
        requests.append(({"q": lines, "beam": 1} if k % 2 else {"q": lines, "beam": 4, "nbest": 2}))
    total = sum(len(r["q"]) for r in requests)
    answers = run(_client_calls(server, [("/v1/translate", r) for r in requests], gate, total))
    server.batcher.stop()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert server.batcher.cycles == 2  # one batch per search setting: the requests were decoded together
    assert len(encoded) == total
    translator = reference_translator(engine)
    for request, answer in zip(requests, answers):
        settings = tr.settings_from(engine.cfg, beam_size=request["beam"], nbest=request.get("nbest", 1))
        alone = translator.translate_lines(engine.params, request["q"], settings, progress=False)
        got = answer.json()["translations"]
        assert [[h["text"] for h in t["hypotheses"]] for t in got] == [[text for text, _ in hyps] for hyps in alone]
        assert [h["score"] for t in got for h in t["hypotheses"]] == pytest.approx(
            [score for hyps in alone for _, score in hyps], abs=1e-5)


def record_batch_shapes(monkeypatch) -> list:
    """Makes every search program note the (rows, source length) of each batch it runs; the list."""
    used = []
    original = tr.compiled_search

    class Recording:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, params, src, *rest):
            used.append(tuple(src.shape))
            return self.fn(params, src, *rest)

        def program(self, *args):  # loaded ahead of a batch, not run
            return self.fn.program(*args)

        def loaded(self, *args):
            return self.fn.loaded(*args)

        def note_loaded(self, *args):
            return self.fn.note_loaded(*args)

    monkeypatch.setattr(tr, "compiled_search", lambda *args, **kwargs: Recording(original(*args, **kwargs)))
    return used


def test_server_rows_are_powers_of_two_or_one_and_a_half_times_one():
    """A batch of n lines goes on the next of 2, 3, 4, 6, 8, 12, 16, 24, ... rows (at least 2 a
    device, a multiple of the devices): 9 lines on 12 rows, not 16."""
    from transformer_mt.serve.engine import rows_for

    assert [rows_for(n, 1) for n in range(1, 18)] == [2, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 24]
    assert [rows_for(n, 2) for n in (1, 3, 5, 7, 9, 33)] == [4, 4, 6, 8, 12, 48]


def test_batch_shapes_are_a_fixed_set_compiled_at_warm_up(engine, monkeypatch):
    """The server pads each batch to a power of two of rows or 1.5x one, so its (rows, length)
    shapes are the fixed set Engine.shapes lists; warm-up compiles exactly that set, and requests
    of every size from 1 to 20 lines afterwards compile nothing new, and are answered as
    `translate` answers them."""
    used = record_batch_shapes(monkeypatch)
    settings = engine.settings(beam_size=1)
    fixed = set(engine.shapes(settings))
    engine.warm_up([settings])
    assert not engine.warming and engine.warm_total == len(fixed) and engine.warm_error is None
    assert set(used) == fixed and len(used) == len(fixed)
    programs = engine.programs.count
    del used[:]
    server = make_server(engine)
    assert server.batcher.max_lines == engine.max_rows
    requests = [[LINES[k % 7] for k in range(n, 2 * n)] for n in range(1, 21)]

    async def calls():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            return [await client.post("/v1/translate", json={"q": q, "beam": 1}) for q in requests]

    answers = run(calls())
    server.batcher.stop()
    assert set(used) <= fixed, sorted(set(used) - fixed)
    assert engine.programs.count == programs  # no compile after warm-up
    offline = reference_translator(engine)
    for q, answer in zip(requests, answers):
        alone = offline.translate_lines(engine.params, q, settings, progress=False)
        assert [t["hypotheses"][0]["text"] for t in answer.json()["translations"]] == [h[0][0] for h in alone]


def test_a_cycle_is_decoded_a_length_bucket_at_a_time(engine, monkeypatch):
    """A cycle's lines of two length buckets go in two search loops, each line padded to its own
    bucket as `translate` pads a file's (one loop padded to the longest line moved int8 answers on
    near-ties), and the answers are translate's."""
    lines = ["Kids .", "A woman in a red dress is walking down the street ."]
    buckets = (8, engine.translator.buckets[-1])  # the test run's one decoding bucket, split in two
    monkeypatch.setattr(engine.translator, "buckets", buckets)
    lengths = [len(ids) for ids in engine.encode(lines)]
    assert data_lib.bucket_for(lengths[0], buckets) < data_lib.bucket_for(lengths[1], buckets)  # two buckets
    used = record_batch_shapes(monkeypatch)
    answers = engine.translate(lines, engine.settings(beam_size=1))
    assert sorted(shape[1] for shape in used) == list(buckets)
    offline = reference_translator(engine)
    monkeypatch.setattr(offline, "buckets", buckets)
    alone = offline.translate_lines(engine.params, lines, engine.settings(beam_size=1))
    assert [h[0].text for h in answers] == [h[0][0] for h in alone]


def test_a_cycle_decodes_beams_in_small_length_sorted_batches(engine, monkeypatch):
    """A cycle's lines go in batches of at most BATCH_HYPOTHESIS_TOKENS source tokens x hypotheses
    (beam 4: 8 lines of the test run's 16 tokens, where its config's decode.batch_tokens allows
    16), and their answers are translate's, which batches a file by the run's decode.batch_tokens."""
    from transformer_mt.serve.engine import BATCH_HYPOTHESIS_TOKENS

    lines = [[line for line in LINES if line][k % 6] for k in range(20)]
    (length,) = engine.translator.buckets
    used = record_batch_shapes(monkeypatch)
    for beam in (4, 1):
        del used[:]
        settings = engine.settings(beam_size=beam)
        per_batch = settings.batch_tokens // length
        assert settings.batch_tokens == min(engine.cfg.decode.batch_tokens, BATCH_HYPOTHESIS_TOKENS // beam)
        assert per_batch == 8 if beam == 4 else per_batch >= 16
        answers = engine.translate(lines, settings)
        sizes = [min(per_batch, len(lines) - k) for k in range(0, len(lines), per_batch)]
        assert sorted(rows for rows, _ in used) == sorted(engine.translator.rows_for(n) for n in sizes)
        offline = reference_translator(engine)
        alone = offline.translate_lines(engine.params, lines, tr.settings_from(engine.cfg, beam_size=beam))
        assert [h[0].text for h in answers] == [h[0][0] for h in alone]


def test_a_request_is_answered_as_soon_as_its_batch_is_decoded(engine, monkeypatch):
    """Two requests in one cycle, a short line and a long one (two length buckets, two batches):
    the short one's request is answered once its batch is decoded, before the long one's batch
    runs, and both answers are translate's."""
    from transformer_mt.serve.batcher import Job

    lines = ["Kids .", "A woman in a red dress is walking down the street ."]
    buckets = (8, engine.translator.buckets[-1])  # the test run's one decoding bucket, split in two
    monkeypatch.setattr(engine.translator, "buckets", buckets)
    ids = engine.encode(lines)
    events = []

    def translate(*args, on_lines=None, **kwargs):  # the engine's, noting each batch handed back
        def noted(done):
            events.append(("batch", [k for k, _ in done]))
            on_lines(done)
        return engine.translate(*args, on_lines=noted, **kwargs)

    gate = Gate()
    gate.closed = True
    batcher = Batcher(translate, engine.cfg.decode.batch_tokens, max_wait=0.0, hold=gate)
    settings = engine.settings(beam_size=1)
    jobs = [Job([line], engine.padded_tokens([x]), settings, source_ids=[x],
                on_done=lambda job, name=name: events.append(("answered", name)))
            for line, x, name in zip(lines, ids, ("short", "long"))]
    for job in reversed(jobs):  # the long line first in the cycle: batches still go shortest first
        batcher.submit(job)
    gate.closed = False
    batcher.stop()
    assert batcher.cycles == 1
    assert events == [("batch", [1]), ("answered", "short"), ("batch", [0]), ("answered", "long")]
    offline = reference_translator(engine)
    monkeypatch.setattr(offline, "buckets", buckets)
    alone = offline.translate_lines(engine.params, lines, settings)
    assert [j.results[0][0].text for j in jobs] == [h[0][0] for h in alone]


def test_a_cycle_that_fails_fails_only_the_requests_not_yet_answered():
    """A search that fails after its first batch: the request that batch completed keeps its
    answer, the one still waiting fails whole with the error, the counts of busy lines come back
    to zero and the next cycle is decoded."""
    from transformer_mt.serve.batcher import Job

    def translate(lines, settings, prefixes, alignment, first_line=1, source_ids=None, decoder=0, on_lines=None):
        if lines == ["again"]:
            return [["again: ok"]]
        on_lines([(0, [f"{lines[0]}: ok"])])
        raise RuntimeError("device lost")

    gate = Gate()
    gate.closed = True
    batcher = Batcher(translate, budget=100, max_wait=0.0, hold=gate)
    done, both_done = [], threading.Event()

    def on_done(job):
        done.append(job)
        if len(done) == 2:
            both_done.set()

    jobs = [Job([line], [1], "greedy", on_done=on_done) for line in ("first", "second")]
    for job in jobs:
        batcher.submit(job)
    gate.closed = False
    assert both_done.wait(60)
    again = Job(["again"], [1], "greedy", on_done=on_done)
    batcher.submit(again)
    batcher.stop()
    assert jobs[0].error is None and jobs[0].results == [["first: ok"]]
    assert isinstance(jobs[1].error, RuntimeError) and "device lost" in str(jobs[1].error)
    assert again.results == [["again: ok"]] and done == [jobs[0], jobs[1], again]
    assert batcher.busy_lines == 0 and batcher.queued_lines == 0


def reference_translator(engine) -> tr.Translator:
    """A Translator as `transformer-mt translate` makes it (its own row ladder), for the same model."""
    t = engine.translator
    return tr.Translator(engine.cfg, t.graphdef, t.tok, t.mesh)


def test_workers_decode_their_cycles_at_the_same_time():
    """With two workers (a decoder per CPU device) two cycles are decoded at once, each with its
    own decoder: the fake search below returns only once both are inside it, and each job gets
    its own lines back."""
    from transformer_mt.serve.batcher import Job

    both_inside = threading.Barrier(2, timeout=60)  # fails the test if the cycles ran one after the other
    decoders = []

    def translate(lines, settings, prefixes, alignment, first_line=1, source_ids=None, decoder=0, on_lines=None):
        decoders.append(decoder)
        both_inside.wait()
        return [f"{settings}:{line}" for line in lines]

    gate = Gate()
    gate.closed = True
    batcher = Batcher(translate, budget=100, max_wait=0.0, hold=gate, workers=2)
    jobs = [Job(["a", "b"], [1, 1], "greedy"), Job(["c"], [1], "beam 4")]  # two settings: two cycles
    for job in jobs:
        batcher.submit(job)
    gate.closed = False
    batcher.stop()
    assert sorted(decoders) == [0, 1] and batcher.cycles_by_worker == [1, 1]
    assert jobs[0].results == ["greedy:a", "greedy:b"] and jobs[1].results == ["beam 4:c"]


def test_a_decoder_per_cpu_device_answers_as_translate(trained_run):
    """On a CPU split into 2 devices the engine has a decoder per device; each one's answers (greedy
    and beam 4, several batch shapes) are what translate gives over both devices."""
    script = f"""
import sys
from transformer_mt.serve.engine import Engine
from transformer_mt.search import Translator, settings_from
engine = Engine({str(trained_run)!r})
assert len(engine.decoders) == 2 and len({{d.translator.mesh.devices.flat[0] for d in engine.decoders}}) == 2
lines = {LINES!r} * 3
offline = Translator(engine.cfg, engine.translator.graphdef, engine.translator.tok, engine.translator.mesh)
for beam in (1, 4):
    want = [h[0][0] for h in offline.translate_lines(engine.params, lines, settings_from(engine.cfg, beam_size=beam))]
    for k in range(2):
        got = [h[0].text for h in engine.translate(lines, engine.settings(beam_size=beam), decoder=k)]
        assert got == want, (beam, k, got, want)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0 and result.stdout.decode().strip() == "ok", result.stderr.decode()[-3000:]


def test_long_request_is_split_so_short_ones_are_not_starved(engine):
    """A long request queued first does not hold back a short one queued behind it: the first batch
    takes a line of each in turn, so the short one is answered after one batch, not six."""
    from transformer_mt.serve.batcher import Job

    gate = Gate()
    gate.closed = True
    batches = []

    def translate(lines, *args, **kwargs):
        batches.append(list(lines))
        return engine.translate(lines, *args, **kwargs)

    batcher = Batcher(translate, budget=100, max_wait=0.0, hold=gate)  # 10 lines of 10 tokens
    settings = engine.settings(beam_size=1)
    long_lines = [LINES[k % 4] for k in range(48)]
    done = {}
    long_job = Job(long_lines, [10] * len(long_lines), settings, on_done=lambda j: done.setdefault("long", len(batches)))
    short_job = Job(["Kids ."], [10], settings, on_done=lambda j: done.setdefault("short", len(batches)))
    batcher.submit(long_job)
    batcher.submit(short_job)
    gate.closed = False
    batcher.stop()
    assert done == {"short": 1, "long": 5}  # 9 of the long one's 48 lines + the short one, then 10 a batch
    assert batches[0][-1] == "Kids ." and len(batches[0]) == 10
    alone = engine.translator.translate_lines(engine.params, long_lines, settings, progress=False)
    assert [h[0].text for h in long_job.results] == [h[0][0] for h in alone]


@pytest.fixture(scope="module")
def stream(engine):
    """The engine's greedy row pool, compiled once: 2 rows, lines of up to 16 source tokens."""
    from transformer_mt.serve.engine import GreedyStream

    stream = GreedyStream(engine, rows=2, length=16)
    stream.start()
    return stream


def test_row_pool_answers_equal_translate_alone(engine, stream):
    """Greedy requests decoded in the row pool (continuous batching: 2 rows for 8 lines, so rows
    are refilled while others are mid-sentence) get exactly what Translator gives each request
    alone; requests with a line too long for the pool, and a beam request, go by cycles beside it."""
    gate = Gate()
    gate.closed = True
    server = make_server(engine, gate)
    server.batcher.stream, server.batcher.stream_from = stream, 1  # the pool from the first line
    long_line = "A woman in a red dress is walking down the street with her two dogs ."
    lengths = [len(ids) for ids in engine.encode(LINES + [long_line])]
    assert lengths == [15, 11, 8, 16, 1, 17, 11, 23]  # LINES[5] and long_line do not fit the pool
    requests = [{"q": [line], "beam": 1} for line in LINES if line] + [
        {"q": LINES[:3], "beam": 1}, {"q": [LINES[1], long_line], "beam": 1}, {"q": LINES[:2], "beam": 2}]
    total = sum(len(r["q"]) for r in requests)
    answers = run(_client_calls(server, [("/v1/translate", r) for r in requests], gate, total))
    server.batcher.stop()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert server.batcher.cycles == 2  # greedy: the two requests with a long line; the beam request
    assert server.batcher.stream_steps >= 4 and stream.active == 0  # 2 rows, 8 pooled lines: refilled
    translator = reference_translator(engine)
    for request, answer in zip(requests, answers):
        settings = tr.settings_from(engine.cfg, beam_size=request["beam"])
        alone = translator.translate_lines(engine.params, request["q"], settings, progress=False)
        got = answer.json()["translations"]
        assert [t["hypotheses"][0]["text"] for t in got] == [hyps[0][0] for hyps in alone]
        assert [t["hypotheses"][0]["score"] for t in got] == pytest.approx([hyps[0][1] for hyps in alone], abs=1e-4)


def test_row_pool_takes_jobs_from_a_load_until_it_falls(engine, stream):
    """Jobs go to the pool once the server holds stream_from lines, and by cycles again once it
    holds stream_until or fewer (not back and forth around one threshold)."""
    from transformer_mt.serve.batcher import Job

    gate = Gate()
    gate.closed = True
    batcher = Batcher(engine.translate, engine.cfg.decode.batch_tokens, max_wait=0.0, hold=gate, stream=stream,
                      stream_from=3, stream_until=1)
    settings = engine.settings(beam_size=1)

    answered = []

    def job(lines):
        ids = engine.encode(lines)
        done = threading.Event()
        answered.append(done)
        return Job(lines, engine.padded_tokens(ids), settings, source_ids=ids, on_done=lambda _: done.set())

    jobs = [job(LINES[:1]), job(LINES[1:3]), job(LINES[2:3])]  # the server holds 1, then 3, then 4 lines
    for j in jobs:
        batcher.submit(j)
    assert [j in batcher._streamed for j in jobs] == [False, True, True]
    gate.closed = False
    for done in answered:
        assert done.wait(600)
    last = job(LINES[:1])  # the server holds 1 line again: by cycles
    batcher.submit(last)
    batcher.stop()
    assert batcher.cycles == 2 and batcher.stream_steps >= 1
    assert [h[0].text for h in last.results] == [h[0].text for h in jobs[0].results]


def test_row_pool_failure_fails_its_requests_and_serving_goes_on(engine, stream, monkeypatch):
    """A failure while the pool decodes answers its requests with a 500 and frees the pool's rows;
    the next request is decoded normally."""
    server = make_server(engine)
    server.batcher.stream, server.batcher.stream_from = stream, 1
    calls = {"n": 0}
    advance = stream.pool.advance

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return advance()

    monkeypatch.setattr(stream.pool, "advance", failing_once)
    first = run(_client_calls(server, [("/v1/translate", {"q": LINES[:3], "beam": 1})]))[0]
    assert first.status_code == 500 and "device lost" in first.json()["error"]
    assert stream.active == 0 and server.batcher.busy_lines == 0
    second = run(_client_calls(server, [("/v1/translate", {"q": LINES[:3], "beam": 1})]))[0]
    server.batcher.stop()
    alone = engine.translator.translate_lines(engine.params, LINES[:3], engine.settings(beam_size=1))
    assert [t["hypotheses"][0]["text"] for t in second.json()["translations"]] == [h[0][0] for h in alone]


BAD_REQUESTS = [
    # (path, body bytes, content type, status, words the error must contain)
    ("/v1/translate", b'{"q": ', "application/json", 400, "not valid JSON"),
    ("/v1/translate", b'["A dog ."]', "application/json", 400, "JSON object"),
    ("/v1/translate", b'{"text": "A dog ."}', "application/json", 400, "missing field q"),
    ("/v1/translate", b'{"q": 3}', "application/json", 400, "field q"),
    ("/v1/translate", b'{"q": ["a", 1]}', "application/json", 400, "field q"),
    ("/v1/translate", b'{"q": ""}', "application/json", 400, "field q is empty"),
    ("/v1/translate", b'{"q": []}', "application/json", 400, "field q is empty"),
    ("/v1/translate", b'{"q": "a", "beam": "wide"}', "application/json", 400, "field beam"),
    ("/v1/translate", b'{"q": "a", "beam": 0}', "application/json", 400, "field beam"),
    ("/v1/translate", b'{"q": "a", "nbest": 3, "beam": 2}', "application/json", 400, "field nbest"),
    ("/v1/translate", b'{"q": "a", "alpha": "x"}', "application/json", 400, "field alpha"),
    ("/v1/translate", b'{"q": "a", "sampling": "topk:0"}', "application/json", 400, "field sampling"),
    ("/v1/translate", b'{"q": "a", "alignment": "yes"}', "application/json", 400, "field alignment"),
    ("/v1/translate", b'{"q": ["a", "b"], "prefix": "x"}', "application/json", 400, "field prefix"),
    ("/v1/translate", b'{"q": "a\\nb", "attention": true}', "application/json", 400, "field attention"),
    ("/v1/translate", b'{"q": "' + b"word " * 300 + b'"}', "application/json", 413, "characters"),
    ("/v1/translate", b'{"q": "' + b"a\\n" * 30 + b'"}', "application/json", 413, "lines"),
    ("/v1/translate", b"x" * 200_000, "application/json", 413, "bytes"),
    ("/translate", b'{"q": "a", "source": "fr", "target": "de"}', "application/json", 400, "field source"),
    ("/translate", b'{"q": "a", "source": "en", "target": "fr"}', "application/json", 400, "field target"),
    ("/translate", b'{"q": "a", "format": "html"}', "application/json", 400, "field format"),
    ("/translate", b'{"q": "a", "alternatives": -1}', "application/json", 400, "field alternatives"),
    ("/translate", b"q=a&alternatives=many", "application/x-www-form-urlencoded", 400, "field alternatives"),
    ("/nowhere", b"{}", "application/json", 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,kind,status,words", BAD_REQUESTS, ids=[f"{i}-{r[3]}" for i, r in
                                                                           enumerate(BAD_REQUESTS)])
def test_bad_request_gets_its_status_and_a_json_error(engine, path, body, kind, status, words):
    server = make_server(engine, max_chars=1000, max_lines=20)

    async def calls():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            bad = await client.post(path, content=body, headers={"Content-Type": kind})
            good = await client.post("/translate", json={"q": "Kids .", "source": "en", "target": "de"})
            return bad, good

    bad, good = run(calls())
    server.batcher.stop()
    assert bad.status_code == status, bad.text
    assert words in bad.json()["error"]
    assert good.status_code == 200 and good.json()["translatedText"]


def test_get_on_translate_is_a_json_405(engine):
    server = make_server(engine)

    async def call():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            return await client.get("/translate")

    answer = run(call())
    server.batcher.stop()
    assert answer.status_code == 405 and answer.json()["error"]


def test_full_queue_503_and_timeout_504_leave_the_others_answered(engine):
    gate = Gate()
    gate.closed = True
    server = make_server(engine, gate, max_lines=6, max_queue_lines=8)
    six = {"q": LINES[:4] + LINES[5:7], "beam": 1}

    async def calls():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            first = asyncio.create_task(client.post("/v1/translate", json=six))
            while server.batcher.queued_lines < 6 and not first.done():
                await asyncio.sleep(0.001)
            full = await client.post("/v1/translate", json=six)  # 6 + 6 > 8 lines
            gate.closed = False
            return await first, full

    first, full = run(calls())
    server.batcher.stop()
    assert full.status_code == 503 and full.headers["Retry-After"] == "1" and "busy" in full.json()["error"]
    assert first.status_code == 200 and len(first.json()["translations"]) == 6

    gate.closed = True  # never opened: the request times out, and its lines leave the queue
    server = make_server(engine, gate, timeout=0.2)
    (late,) = run(_client_calls(server, [("/v1/translate", {"q": "Kids ."})]))
    assert late.status_code == 504 and "timed out" in late.json()["error"]
    assert server.batcher.queued_lines == 0
    gate.closed = False
    server.batcher.stop()


def test_hostile_text_is_read_as_translate_reads_a_file(engine):
    """Raw control characters, invalid UTF-8 and line breaks inside q: the answer equals
    `translate` on the same bytes as a file (each line, cleaned)."""
    server = make_server(engine)
    raw = b'{"q": "A \xff dog\x01 runs .\\r\\n\\tKids \xe2\x80\xa8 ."}'

    async def call():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            return await client.post("/translate", content=raw, headers={"Content-Type": "application/json"})

    answer = run(call())
    server.batcher.stop()
    assert answer.status_code == 200, answer.text
    lines = list(textio.decode_lines([b"A \xff dog\x01 runs .\r\n", b"\tKids \xe2\x80\xa8 .\n"], "file"))
    expected = engine.translator.translate_lines(engine.params, lines, engine.settings(), progress=False)
    assert answer.json()["translatedText"] == "\n".join(h[0][0] for h in expected)


def test_libretranslate_shapes_round_trip(engine):
    server = make_server(engine)
    one, many = "Two dogs play in the snow .", ["A man is riding a bike .", "Kids ."]

    async def calls():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            return await asyncio.gather(
                client.post("/translate", json={"q": one, "source": "en", "target": "de", "format": "text"}),
                client.post("/translate", json={"q": many, "source": "auto", "target": "de"}),
                client.post("/translate", json={"q": one, "source": "en", "target": "de", "alternatives": 1}),
                client.post("/translate", json={"q": many, "source": "en", "target": "de", "alternatives": 1}),
                client.post("/translate", data={"q": one, "source": "en", "target": "de"}),  # a form
                client.post("/translate", json={"q": "Kids .\nA man is riding a bike .", "source": "en",
                                                "target": "de"}),
                client.get("/languages"))

    plain, listed, alt, alts, form, two_lines, langs = run(calls())
    server.batcher.stop()
    best = tr.settings_from(engine.cfg)
    two = tr.settings_from(engine.cfg, nbest=2, beam_size=max(2, engine.default_beam))

    def offline(lines, settings):
        return engine.translator.translate_lines(engine.params, lines, settings, progress=False)

    assert plain.json() == {"translatedText": offline([one], best)[0][0][0]}
    assert form.json() == plain.json()
    assert listed.json() == {"translatedText": [h[0][0] for h in offline(many, best)],
                             "detectedLanguage": [{"confidence": 100.0, "language": "en"}] * 2}
    (hyps,) = offline([one], two)
    assert alt.json() == {"translatedText": hyps[0][0], "alternatives": [hyps[1][0]]}
    nbest = offline(many, two)
    assert alts.json() == {"translatedText": [h[0][0] for h in nbest], "alternatives": [[h[1][0]] for h in nbest]}
    assert two_lines.json()["translatedText"] == "\n".join(h[0][0] for h in offline(["Kids .", many[0]], best))
    assert langs.json() == [{"code": "en", "name": "English", "targets": ["de"]},
                            {"code": "de", "name": "German", "targets": []}]


def test_v1_options_equal_translate_command(engine, trained_run, tmp_path):
    """Sampling with a seed, n-best with scores, a prefix and alignments: the answers equal the
    `translate` command's output for the same lines."""
    from conftest import cli_here

    server = make_server(engine)
    lines = ["A man is riding a bike .", "Kids ."]
    src = tmp_path / "src.txt"
    src.write_text("".join(line + "\n" for line in lines))
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Ein\n\n")

    async def calls():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            return await asyncio.gather(
                client.post("/v1/translate", json={"q": lines, "sampling": "topk:5", "nbest": 2, "seed": 7}),
                client.post("/v1/translate", json={"q": lines, "prefix": ["Ein", ""], "alignment": True, "beam": 1}))

    sampled, prefixed = run(calls())
    server.batcher.stop()
    assert sampled.status_code == 200 and prefixed.status_code == 200
    run_dir = str(trained_run)
    out = cli_here("translate", "--checkpoint", run_dir, "-i", str(src), "--sampling", "topk:5", "--nbest", "2",
                   "--seed", "7", "--no-progress", "--cpu-devices", "1")
    expected = [line.split(" ||| ") for line in out.stdout.decode().splitlines()]
    got = [[str(i), h["text"], f"{h['score']:.4f}"] for i, t in enumerate(sampled.json()["translations"])
           for h in t["hypotheses"]]
    assert got == expected
    out = cli_here("translate", "--checkpoint", run_dir, "-i", str(src), "--prefix", str(prefix), "--alignment",
                   "--beam", "1", "--no-progress", "--cpu-devices", "1")
    expected = [line.split(" ||| ") for line in out.stdout.decode().splitlines()]
    got = [[t["hypotheses"][0]["text"], t["hypotheses"][0]["alignment"]] for t in prefixed.json()["translations"]]
    assert got == expected and got[0][0].startswith("Ein")


# ----------------------------------------------------------------------------- the real command


@contextlib.contextmanager
def serving(run_dir, *extra: str):
    """`transformer-mt serve` on a free localhost port: yields (process, base url) once it is ready."""
    command = ["serve", "--checkpoint", str(run_dir), "--port", "0", "--cpu-devices", "1", "--timeout", "600"]
    proc = subprocess.Popen([sys.executable, "-m", "transformer_mt.cli", *command, *extra], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = []
    url = None
    for line in proc.stderr:  # blocks until the ready line (or the end of a failed start)
        log.append(line)
        if "ready on " in line:
            url = line.split("ready on ")[1].split()[0]
            break
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        assert url, "serve did not start:\n" + "".join(log)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)


def _offline(engine, lines, **overrides):
    settings = tr.settings_from(engine.cfg, **overrides)
    return [h[0][0] for h in engine.translator.translate_lines(engine.params, lines, settings, progress=False)]


def test_sigterm_answers_every_accepted_request_then_exits_0(engine, trained_run, tmp_path):
    """Requests are queued (the batcher held), SIGTERM arrives, the server stops accepting; then
    the batcher runs and every queued request gets its full answer before the process exits 0."""
    hold = tmp_path / "hold"
    hold.touch()
    requests = [LINES[k % 4: k % 4 + 1 + k % 2] for k in range(8)]  # 1-2 lines, one empty
    with serving(trained_run, "--hold-while-exists", str(hold)) as (proc, url, log):
        answers = [None] * len(requests)

        def send(k):
            answers[k] = httpx.post(f"{url}/v1/translate", json={"q": requests[k], "beam": 1}, timeout=600)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        total = sum(len(r) for r in requests)
        while httpx.get(f"{url}/health").json()["queue_lines"] < total and all(t.is_alive() for t in threads):
            pass  # every request is in the queue
        proc.send_signal(signal.SIGTERM)
        while True:  # stopped accepting: new connections are refused
            try:
                httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                break
        assert proc.poll() is None  # still running: the queued requests are not answered yet
        hold.unlink()
        for t in threads:
            t.join()
        assert proc.wait(120) == 0, "".join(log)
    assert [a.status_code for a in answers] == [200] * len(requests)
    for request, answer in zip(requests, answers):
        assert [t["hypotheses"][0]["text"] for t in answer.json()["translations"]] == _offline(engine, request,
                                                                                                  beam_size=1)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,900"]


def chromium_driver(profile_dir):
    """Selenium driving Debian's chromium through its chromedriver (no browser download), or None."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        return None
    os.environ["SE_OFFLINE"] = "true"  # selenium manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def test_web_page_translates_in_a_real_browser(engine, trained_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(tmp_path / "profile")
    if browser is None:
        pytest.skip("no chromium + chromedriver installed (apt-get install chromium chromium-driver)")
    sentence = "Two dogs play in the snow ."
    try:
        with serving(trained_run) as (proc, url, log):
            browser.get(url + "/")
            browser.find_element(By.ID, "source").send_keys(sentence)
            browser.find_element(By.ID, "translate").click()
            wait = WebDriverWait(browser, 120)
            text = wait.until(lambda b: b.find_element(By.ID, "translation").text)
            rows = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#attention table.heat tbody tr"))
            title = browser.find_element(By.ID, "langs").text
    finally:
        browser.quit()
    assert text == _offline(engine, [sentence])[0]
    target_pieces = engine.translator.tok.encode_tgt([text])[0]
    assert len(rows) == len(target_pieces) + 1  # a row per target piece and </s>
    assert title == "English → German"


def test_serve_precision_applies_to_every_request(engine, monkeypatch):
    """`serve --precision float32` decodes every request, whatever its options, in float32 (the
    setting under which answers equal translate's line for line)."""
    assert engine.settings(beam_size=1).precision == engine.settings().precision
    for precision in ("float32", "int8"):
        monkeypatch.setattr(engine, "precision", precision)
        assert engine.settings().precision == precision
        assert engine.settings(beam_size=1, nbest=1).precision == precision
