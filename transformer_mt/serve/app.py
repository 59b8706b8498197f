"""The HTTP application: LibreTranslate's API, our own /v1/translate, /health and the web page.

Handlers only read and check requests (fields.py) and shape answers; every line goes through the
one Batcher, which decodes concurrent requests together (batcher.py) with the Engine (engine.py).
Errors are JSON objects {"error": "..."} with a status code: 400 bad field, 404/405, 413 over a
request limit, 503 queue full (with Retry-After), 504 timed out, 500 a failure while decoding
(the server goes on answering others).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from transformer_mt.config import ConfigError
from transformer_mt.serve.batcher import Batcher, Job, QueueFull
from transformer_mt.serve.engine import Engine, Hypothesis
from transformer_mt.serve.fields import (FORM_TYPES, ApiError, Limits, boolean, integer, number, parse_json,
                                         split_lines, string, texts_of)

LANGUAGE_NAMES = {"ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
                  "it": "Italian", "ja": "Japanese", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
                  "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "uk": "Ukrainian", "zh": "Chinese"}
RETRY_AFTER_S = 1


@dataclass
class Server:
    engine: Engine
    batcher: Batcher
    limits: Limits

    async def translate(self, lines: list[str], settings, prefixes=None, alignment: bool = False
                        ) -> list[list[Hypothesis]]:
        """The lines' hypotheses, decoded by the batcher together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(job: Job) -> None:  # worker thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(job))

        ids = self.engine.encode(lines)
        job = Job(lines, self.engine.padded_tokens(ids), settings, prefixes=prefixes, alignment=alignment,
                  sampling=bool(settings.sampling), on_done=on_done, source_ids=ids)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry in {RETRY_AFTER_S} s",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            await asyncio.wait_for(done, self.limits.timeout)
        except asyncio.TimeoutError:
            self.batcher.cancel(job)
            raise ApiError(504, f"request timed out after {self.limits.timeout:g} s") from None
        except asyncio.CancelledError:  # the client went away
            self.batcher.cancel(job)
            raise
        if job.error is not None:
            raise ApiError(500, f"translation failed: {type(job.error).__name__}: {job.error}")
        return job.results

    def settings(self, **overrides):
        try:
            return self.engine.settings(**overrides)
        except ConfigError as e:  # worded for the command line: name the fields instead
            message = str(e).replace("beam size must", "field beam must")
            for flag in ("nbest", "sampling", "temperature"):
                message = message.replace(f"--{flag}", f"field {flag}")
            raise ApiError(400, message) from None


async def read_fields(request: Request, limits: Limits) -> dict:
    """The request's fields: a JSON object, or form fields (a repeated q becomes a list)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_limit(limits):
        raise ApiError(413, f"request body has {length} bytes; at most {body_limit(limits)}")
    body = await request.body()
    if len(body) > body_limit(limits):
        raise ApiError(413, f"request body has {len(body)} bytes; at most {body_limit(limits)}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in FORM_TYPES and not body.lstrip().startswith(b"{"):  # curl -d '{...}' says it sends a form
        try:
            form = await request.form(max_files=0)
        except Exception as e:  # noqa: BLE001 (malformed form bodies raise many kinds)
            raise ApiError(400, f"request body is not valid form data ({e})") from None
        fields: dict = {}
        for key, value in form.multi_items():
            if key == "q" and "q" in fields:
                fields["q"] = (fields["q"] if isinstance(fields["q"], list) else [fields["q"]]) + [value]
            else:
                fields[key] = value
        return fields
    return parse_json(body)


def body_limit(limits: Limits) -> int:
    """Bytes a request body may have: room for max_chars characters of 4 UTF-8 bytes, escaped."""
    return 24 * limits.max_chars + 65536


def _join(hyps_of_lines: list[list[Hypothesis]], k: int) -> str:
    return "\n".join(h[k].text for h in hyps_of_lines)


def _per_text(results: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(results[start: start + n])
        start += n
    return out


# ----------------------------------------------------------------------------- routes


async def libre_translate(request: Request) -> JSONResponse:
    """LibreTranslate's POST /translate: q, source, target, format, alternatives (api_key ignored)."""
    server: Server = request.app.state.server
    engine = server.engine
    fields = await read_fields(request, server.limits)
    texts, many = texts_of(fields)
    source = string(fields, "source") or "auto"
    target = string(fields, "target") or engine.tgt_lang
    if source not in ("auto", engine.src_lang):
        raise ApiError(400, f"field source: this server translates {engine.src_lang} to {engine.tgt_lang}, "
                       f"not from {source!r}")
    if target != engine.tgt_lang:
        raise ApiError(400, f"field target: this server translates {engine.src_lang} to {engine.tgt_lang}, "
                       f"not into {target!r}")
    fmt = string(fields, "format") or "text"
    if fmt != "text":
        raise ApiError(400, f"field format: only 'text' is supported, not {fmt!r}")
    alternatives = integer(fields, "alternatives", 0, server.limits.max_nbest - 1, 0)
    settings = server.settings(nbest=alternatives + 1, beam_size=max(engine.default_beam, alternatives + 1))
    lines, counts = split_lines(texts, server.limits)
    per_text = _per_text(await server.translate(lines, settings), counts)
    main = [_join(h, 0) for h in per_text]
    answer: dict = {"translatedText": main if many else main[0]}
    if alternatives:
        alts = [[_join(h, k) for k in range(1, alternatives + 1)] for h in per_text]
        answer["alternatives"] = alts if many else alts[0]
    if source == "auto":  # one source language: nothing to detect
        detected = {"confidence": 100.0, "language": engine.src_lang}
        answer["detectedLanguage"] = [detected] * len(texts) if many else detected
    return JSONResponse(answer)


async def v1_translate(request: Request) -> JSONResponse:
    """Our own API: every search option of `transformer-mt translate`, n-best lists with scores."""
    server: Server = request.app.state.server
    limits = server.limits
    fields = await read_fields(request, limits)
    texts, _ = texts_of(fields)
    lines, counts = split_lines(texts, limits)
    prefixes = None
    if "prefix" in fields:
        prefixes, _ = texts_of(fields, "prefix")
        if len(prefixes) != len(texts) or len(lines) != len(texts):
            raise ApiError(400, "field prefix must have one string per q text, and each q text one line")
    settings = server.settings(
        beam_size=integer(fields, "beam", 1, limits.max_beam), alpha=number(fields, "alpha"),
        nbest=integer(fields, "nbest", 1, limits.max_nbest, 1), sampling=string(fields, "sampling"),
        temperature=number(fields, "temperature"), seed=integer(fields, "seed", 0, 2 ** 31 - 1),
        max_len_a=number(fields, "max_len_a"), max_len_b=integer(fields, "max_len_b", 0, 1024))
    alignment, attention = boolean(fields, "alignment"), boolean(fields, "attention")
    if attention and len(lines) != 1:
        raise ApiError(400, "field attention needs exactly one line of text")
    per_text = _per_text(await server.translate(lines, settings, prefixes, alignment), counts)
    translations = []
    for hyps in per_text:
        out = []
        for k in range(settings.nbest):
            h = {"text": _join(hyps, k), "score": round(sum(line[k].score for line in hyps), 6)}
            if alignment:
                h["alignment"] = "\n".join(line[k].alignment or "" for line in hyps)
            out.append(h)
        translations.append({"hypotheses": out})
    answer: dict = {"translations": translations}
    if attention:
        best = per_text[0][0][0].text
        answer["attention"] = await asyncio.to_thread(server.engine.attention, lines[0], best)
    return JSONResponse(answer)


async def languages(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.server.engine
    return JSONResponse([
        {"code": engine.src_lang, "name": LANGUAGE_NAMES.get(engine.src_lang, engine.src_lang),
         "targets": [engine.tgt_lang]},
        {"code": engine.tgt_lang, "name": LANGUAGE_NAMES.get(engine.tgt_lang, engine.tgt_lang), "targets": []},
    ])


async def health(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    return JSONResponse({
        "status": "warming" if server.engine.warming else "ok", "model_loaded": True,
        "warm_up": {"shapes": server.engine.warm_total, "done": server.engine.warm_done,
                    "error": None if server.engine.warm_error is None else str(server.engine.warm_error)}, "step": server.engine.step,
        "source": server.engine.src_lang, "target": server.engine.tgt_lang,
        "queue_lines": server.batcher.queued_lines, "busy_lines": server.batcher.busy_lines,
        "requests_in_flight": request.app.state.in_flight, "batches": server.batcher.cycles,
        "batches_by_decoder": server.batcher.cycles_by_worker,
        "row_pool": None if server.batcher.stream is None else {
            "rows": server.batcher.stream.rows, "active": server.batcher.stream.active,
            "ready": server.batcher.stream.pool is not None, "steps": server.batcher.stream_steps},
        "programs": server.engine.programs.count,
        "programs_from_cache": server.engine.programs.from_cache, "devices": server.engine.devices,
    })


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


# ----------------------------------------------------------------------------- the app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error", exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}")


class CountInFlight:
    """ASGI middleware: how many HTTP requests are being answered (GET /health reports it)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def create_app(server: Server, on_stop=None) -> Starlette:
    """The Starlette app serving `server`; the batcher is stopped (its queue finished) on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.batcher.stop)
        if on_stop is not None:
            on_stop()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/translate", libre_translate, methods=["POST"]),
        Route("/languages", languages, methods=["GET"]),
        Route("/v1/translate", v1_translate, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected})
    app.state.server = server
    app.state.in_flight = 0
    app.state.page = importlib.resources.files("transformer_mt.serve").joinpath("page.html").read_text("utf-8")
    app.add_middleware(CountInFlight, state=app.state)
    return app
