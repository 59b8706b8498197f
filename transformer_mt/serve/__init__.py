"""`transformer-mt serve`: translations over HTTP, concurrent requests decoded together.

    engine.py   the run, loaded once; the one place that calls the Translator API
    batcher.py  the queue and the worker thread that batches across requests
    fields.py   reading and checking request fields; JSON errors
    app.py      the routes: LibreTranslate's /translate and /languages, /v1/translate, /health, /
    page.html   the web page

Needs the optional extra: pip install 'transformer_mt[serve]' (Starlette and uvicorn).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

EXTRA_HINT = "pip install 'transformer_mt[serve]'"


def serve_command(args) -> int:
    from transformer_mt.config import ConfigError

    try:
        import uvicorn

        from transformer_mt.serve.app import Server, create_app
    except ImportError as e:
        raise ConfigError(f"serve needs the optional extra ({e.name} is missing): {EXTRA_HINT}") from None
    from transformer_mt.serve.batcher import Batcher
    from transformer_mt.serve.engine import Engine, GreedyStream
    from transformer_mt.serve.fields import Limits

    limits = Limits(max_chars=args.max_chars, max_lines=args.max_lines, max_queue_lines=args.max_queue_lines,
                    timeout=args.timeout)
    if args.pool_rows < 0:
        raise ConfigError(f"--pool-rows must be 0 (off) or positive, got {args.pool_rows}")
    if args.pool_steps < 1:
        raise ConfigError(f"--pool-steps must be positive, got {args.pool_steps}")
    for name in ("max_chars", "max_lines", "max_queue_lines", "timeout", "batch_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if limits.max_queue_lines < limits.max_lines:
        raise ConfigError(f"--max-queue-lines ({limits.max_queue_lines}) must be at least --max-lines "
                          f"({limits.max_lines})")
    sock = _bind(args.host, args.port)  # before loading: a port in use fails at once
    # a decoder per CPU device, each with its own batching worker; the row pool spans every device
    engine = Engine(args.checkpoint, args.step, args.last, precision=getattr(args, "precision", None),
                    per_device=not args.pool_rows)
    # every batch shape of greedy and of the run's own search (LibreTranslate's requests), compiled
    # or loaded from the compile cache in the background: /health says "warming" until done
    stream = GreedyStream(engine, rows=args.pool_rows, chunk=args.pool_steps) if args.pool_rows else None
    engine.start_warm_up([engine.settings(beam_size=1), engine.settings()], stream)
    hold = (lambda: os.path.exists(args.hold_while_exists)) if args.hold_while_exists else None
    batcher = Batcher(engine.translate, args.batch_tokens or engine.cfg.decode.batch_tokens,
                      max_wait=args.max_wait_ms / 1000, max_queue_lines=limits.max_queue_lines, hold=hold,
                      max_lines=engine.max_rows, stream=stream, workers=len(engine.decoders))
    app = create_app(Server(engine, batcher, limits))
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    programs = engine.programs.count

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print(f"transformer-mt serve: ready on {url} (checkpoint step {engine.step}, {engine.src_lang}->"
                  f"{engine.tgt_lang}, {engine.devices} device(s), {programs} programs; warming up {engine.warm_total} shapes in the "
                  f"background)", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(limits.timeout) + 5)
    # uvicorn stops gracefully on SIGTERM/SIGINT (no new connections, requests in flight answered,
    # then the lifespan's end drains the batcher), restores the handlers it found and raises the
    # signal again: a SIGTERM handler that does nothing makes that last step a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    ReadyServer(config).run(sockets=[sock])
    engine.stop_warm_up()
    print(f"transformer-mt serve: stopped ({batcher.cycles} batches)", file=sys.stderr)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    from transformer_mt.config import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
