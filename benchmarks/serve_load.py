"""Load test of `transformer-mt serve`: concurrent clients, each sending one test_2016 sentence at a time.

    python benchmarks/serve_load.py --checkpoint RUN [--beam 1] [--clients 1,8,32,64] [--soak]

1. Translates data/multi30k/test_2016_flickr.en.gz as `translate` does (a subprocess, the same
   CPU devices as the server), --file-passes times: the median of the passes after the first is
   translate's file throughput (one pass of ~1 s swung by +-20%), and the lines are the reference
   every served answer is checked against.
2. Starts the server on a free localhost port (start-to-ready time), waits until /health says its
   background warm-up of every batch shape is done (time and programs printed; --client-warm-up
   adds a pass over the test set at each client count), and notes the count of compiled programs.
3. For each client count: every client sends single sentences (POST /v1/translate) one after
   another until --requests are answered; prints p50/p95/p99 latency, sentences/s, errors and
   mismatches, programs compiled since warm-up, the server's RSS, the CPU the server and the
   clients used (of the machine's cores), the batches and the row pool's steps the server ran (see
   `serve --pool-rows`), and the server's sentences per
   CPU-second against `translate`'s (how well batching works, whatever the clients take).
4. --soak: 32 clients for --soak-minutes (10); RSS at start and end.

The clients (asyncio, each its own keep-alive connection; --client httpx for httpx ones) run in
--client-procs processes (2) on the same CPU as the server: their CPU time, printed, is part of what
the server's latency pays for.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import resource
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE = ROOT / "data" / "multi30k" / "test_2016_flickr.en.gz"


def read_test() -> list[str]:
    with gzip.open(TEST_FILE, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def offline_main(run: str, beam: int, cpu_devices: int, precision: str | None = None, passes: int = 5) -> None:
    """(subprocess) translate the test set `passes` times the way `translate` does; print JSON."""
    from transformer_mt import compile_cache
    from transformer_mt.host_memory import keep_freed_memory
    from transformer_mt.sharding import split_cpu

    keep_freed_memory()  # as the CLI's translate and serve do
    split_cpu(cpu_devices)
    compile_cache.enable()
    from transformer_mt import search as tr
    from transformer_mt.rundir import load_run

    cfg, graphdef, params, tok, step, mesh = load_run(run)
    translator = tr.Translator(cfg, graphdef, tok, mesh)
    settings = tr.settings_from(cfg, beam_size=beam, precision=precision)
    lines = read_test()
    times, cpu = [], []
    for _ in range(max(passes, 2)):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = [h[0][0] for h in translator.translate_lines(params, lines, settings)]
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # all threads
    print(json.dumps({"seconds": times, "cpu_seconds": statistics.median(cpu[1:]), "lines": out, "step": step}))


def offline(run: str, beam: int, cpu_devices: int, precision: str | None = None, passes: int = 5) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--offline", "--checkpoint", run, "--beam", str(beam),
                          "--cpu-devices", str(cpu_devices), "--file-passes", str(passes)]
                         + (["--precision", precision] if precision else []),
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def start_server(run: str, cpu_devices: int, extra: list[str]):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "transformer_mt.cli", "serve", "--checkpoint", run, "--port", "0",
                             "--cpu-devices", str(cpu_devices), *extra], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    for line in proc.stderr:
        if "ready on " in line:
            return proc, line.split("ready on ")[1].split()[0], time.perf_counter() - start, line.strip()
    raise SystemExit(f"serve did not start (exit {proc.wait()})")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads JSON back, on asyncio streams.

    A load generator must not be what it measures: on this 2-core machine the clients share the
    server's cores, and httpx costs ~7 ms of CPU a request (79-94% of a core at 80-110 requests/s);
    this costs a small fraction of that, as C load generators (wrk, hey) do. Only what the server
    sends is handled: a status line, headers with Content-Length, a body."""

    failures = (OSError, asyncio.IncompleteReadError, ValueError)  # the connection is opened again

    def __init__(self, url: str):
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HttpxConnection:
    """The same with an httpx client of its own (what an application would use; ~7 ms of CPU a
    request here). One client a user: a pool shared by 64 tasks cost the clients 80% of a core and
    made some of them wait for a connection."""

    def __init__(self, url: str):
        import httpx

        self.url, self.failures = url, (httpx.HTTPError,)
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=120)

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        r = await self.http.post(f"{self.url}{path}", json=payload)
        return r.status_code, r.content

    async def close(self) -> None:
        await self.http.aclose()


CONNECTIONS = {"raw": RawConnection, "httpx": HttpxConnection}


async def load(url: str, sentences: list[str], reference: list[str], clients: int, beam: int,
               requests: int | None = None, seconds: float | None = None, client_kind: str = "raw") -> dict:
    """`clients` clients sending one sentence per request until `requests` are answered (or `seconds` pass)."""
    connect = CONNECTIONS[client_kind]
    latencies, errors, mismatches = [], [], 0
    counter = iter(range(10 ** 9))
    end_time = time.perf_counter() + seconds if seconds else None

    async def user():  # its own connection, as separate users have
        nonlocal mismatches
        conn = connect(url)
        try:
            while True:
                n = next(counter)
                if (requests is not None and n >= requests) or (end_time and time.perf_counter() > end_time):
                    return
                k = n % len(sentences)
                start = time.perf_counter()
                try:
                    status, body = await conn.post("/v1/translate", {"q": sentences[k], "beam": beam})
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        errors.append(f"{status} {body[:100]!r}")
                    elif json.loads(body)["translations"][0]["hypotheses"][0]["text"] != reference[k]:
                        mismatches += 1
                except conn.failures as e:
                    errors.append(repr(e))
                    await conn.close()
                    conn = connect(url)
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(clients)))
    return {"latencies": latencies, "wall": time.perf_counter() - start, "errors": errors, "mismatches": mismatches}


def _load_in_process(args) -> dict:
    return asyncio.run(load(*args[:5], requests=args[5], seconds=args[6], client_kind=args[7]))


def run_load(url: str, sentences: list[str], reference: list[str], clients: int, beam: int, procs: int,
             requests: int | None = None, seconds: float | None = None, client_kind: str = "raw") -> dict:
    """`load` split over `procs` client processes (one Python event loop sends ~250 requests/s at
    most here, and became the bottleneck); returns latency quantiles, sentences/s and the clients'
    CPU seconds."""
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (k < clients % procs) for k in range(procs)]
    jobs = [(url, sentences, reference, c, beam, None if requests is None else requests * c // clients, seconds,
             client_kind) for c in shares]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = list(pool.map(_load_in_process, jobs))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    latencies = [x for r in parts for x in r["latencies"]]
    errors = [e for r in parts for e in r["errors"]]
    wall = max(r["wall"] for r in parts)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(latencies), "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000,
            "p99_ms": q[98] * 1000, "sent_per_s": len(latencies) / wall, "errors": len(errors),
            "mismatches": sum(r["mismatches"] for r in parts), "first_errors": errors[:3],
            "client_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/health").json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--clients", default="1,8,32,64", help="client counts, comma-separated")
    p.add_argument("--requests", type=int, default=1000, help="requests per client count (1 client: a fifth)")
    p.add_argument("--cpu-devices", type=int, default=2, help="for both the server and the offline translation")
    p.add_argument("--precision", help="decoding precision of both the server and the reference (default: the run's)")
    p.add_argument("--client-procs", type=int, default=2, help="processes the clients are spread over")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="raw: a lean keep-alive HTTP/1.1 client on asyncio streams (default; the load generator "
                        "should not eat the server's cores); httpx: what an application would use")
    p.add_argument("--soak", action="store_true", help="then 32 clients for --soak-minutes")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for serve (repeatable)")
    p.add_argument("--client-warm-up", action="store_true",
                   help="before measuring, one pass at each client count (the server warms its shapes itself)")
    p.add_argument("--file-passes", type=int, default=5,
                   help="passes of translate over the test set; the median after the first is the file's rate")
    p.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.offline:
        return offline_main(args.checkpoint, args.beam, args.cpu_devices, args.precision, args.file_passes)

    sentences = read_test()
    ref = offline(args.checkpoint, args.beam, args.cpu_devices, args.precision, args.file_passes)
    file_seconds = statistics.median(ref["seconds"][1:])
    file_rate = len(sentences) / file_seconds
    file_per_cpu = len(sentences) / ref["cpu_seconds"]  # sentences per CPU-second of translate
    print(f"translate (file, {len(sentences)} sentences, beam {args.beam}, {args.cpu_devices} device(s)): "
          f"{file_seconds:.2f} s = {file_rate:.1f} sent/s (median of {len(ref['seconds']) - 1} passes: "
          f"{', '.join(f'{t:.2f}' for t in ref['seconds'][1:])} s; first pass {ref['seconds'][0]:.2f} s); "
          f"{file_per_cpu:.0f} sentences per CPU-second", flush=True)

    proc, url, ready_s, ready_line = start_server(args.checkpoint, args.cpu_devices, args.server_arg + (
        ["--precision", args.precision] if args.precision else []))
    print(f"serve: start to ready {ready_s:.2f} s: {ready_line}", flush=True)
    try:
        levels = [int(c) for c in args.clients.split(",")]
        start = time.perf_counter()
        while (h := health(url))["status"] == "warming":  # the server compiles its fixed set of shapes
            time.sleep(0.2)
        print(f"serve: warm-up of {h['warm_up']['shapes']} shapes done {time.perf_counter() - start + ready_s:.2f} s "
              f"after start ({h['programs']} programs, {h['programs_from_cache']} of them from the compile cache or the program store; "
              f"error: {h['warm_up']['error']})", flush=True)
        if args.client_warm_up:  # one pass at each client count
            for clients in levels:
                warm = run_load(url, sentences, ref["lines"], clients, args.beam, args.client_procs,
                                requests=len(sentences) if clients > 1 else 100, client_kind=args.client)
                print(f"warm-up at {clients} clients ({warm['requests']} requests): {warm['errors']} errors, "
                      f"{warm['mismatches']} mismatches; {health(url)['programs']} programs", flush=True)
        programs = health(url)["programs"]
        print("clients  requests  p50 ms  p95 ms  p99 ms  sent/s  vs file  errors  mismatches  new programs  RSS MiB"
              "  server CPU  clients' CPU  batches  pool steps  server sent/CPU-s vs file")
        for clients in levels:
            n = args.requests if clients > 1 else max(1, args.requests // 5)
            before = health(url)
            server_cpu, own_cpu, start = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
            r = run_load(url, sentences, ref["lines"], clients, args.beam, args.client_procs, requests=n,
                         client_kind=args.client)
            wall = time.perf_counter() - start
            server_cpu, own_cpu = (cpu_seconds(proc.pid) - server_cpu) / wall, r["client_cpu_s"] / wall
            h = health(url)
            batches = h["batches"] - before["batches"]
            pool_steps = (h["row_pool"] or {}).get("steps", 0) - (before["row_pool"] or {}).get("steps", 0)
            rss, peak = rss_mb(proc.pid)
            print(f"{clients:7d}  {r['requests']:8d}  {r['p50_ms']:6.1f}  {r['p95_ms']:6.1f}  {r['p99_ms']:6.1f}  "
                  f"{r['sent_per_s']:6.1f}  {r['sent_per_s'] / file_rate:6.0%}  {r['errors']:6d}  "
                  f"{r['mismatches']:10d}  {h['programs'] - programs:12d}  {rss:7.0f}  {server_cpu:9.0%}  {own_cpu:12.0%}  {batches:7d}  {pool_steps:10d}  {r['sent_per_s'] / server_cpu / file_per_cpu:25.0%}"
                  + (f"  {r['first_errors']}" if r["errors"] else ""), flush=True)
        if args.soak:
            rss_start, _ = rss_mb(proc.pid)
            r = run_load(url, sentences, ref["lines"], 32, args.beam, args.client_procs, seconds=args.soak_minutes * 60,
                         client_kind=args.client)
            rss_end, peak = rss_mb(proc.pid)
            print(f"soak: 32 clients, {args.soak_minutes:g} min, {r['requests']} requests, {r['sent_per_s']:.1f} "
                  f"sent/s, p99 {r['p99_ms']:.0f} ms, {r['errors']} errors, {r['mismatches']} mismatches; RSS "
                  f"{rss_start:.0f} -> {rss_end:.0f} MiB ({rss_end / rss_start - 1:+.1%}), peak {peak:.0f} MiB; "
                  f"{health(url)['programs'] - programs} new programs", flush=True)
        _, peak = rss_mb(proc.pid)
        print(f"server peak RSS {peak:.0f} MiB", flush=True)
    finally:
        proc.terminate()
        code = proc.wait(120)
        print(f"serve exited {code} after SIGTERM")


if __name__ == "__main__":
    main()
