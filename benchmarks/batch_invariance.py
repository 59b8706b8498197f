"""Does a sentence's translation depend on what else is in its batch? Counts the test_2016 lines
whose translation differs from the whole file's when the file is decoded in random groups (as the
server's batching cycles cut it), as `translate` decodes (its row ladder, all devices) and as the
server's decoders do (on a CPU split into devices: one device each, powers of two of rows, batches
of at most 512 source tokens x hypotheses), greedy and beam 4, at the run's default precision.

    python benchmarks/batch_invariance.py --checkpoint RUN [--seeds 3] [--max-group 64] [--mixed] [--precision int8]

--mixed also runs the plan the server's small cycles used until 2026-12-05 (`plan_batches(
one_bucket=False)`: a batch's sources padded to the bucket of its longest sentence, so a sentence's
padding depends on its neighbours; RESULTS.md, thirteenth sitting).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformer_mt import compile_cache  # noqa: E402
from transformer_mt.sharding import split_cpu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-group", type=int, default=64)
    p.add_argument("--beams", default="1,4")
    p.add_argument("--cpu-devices", type=int, default=2)
    p.add_argument("--mixed", action="store_true", help="also the neighbour-dependent plan (one_bucket=False)")
    p.add_argument("--precision", help="decoding precision (default: the run's, auto)")
    args = p.parse_args()
    split_cpu(args.cpu_devices)
    compile_cache.enable()
    from transformer_mt import search
    from transformer_mt.serve.engine import Engine

    # the server's engine: its first decoder (on a CPU split into devices, one device) and its
    # settings (small batches); translate's side is a Translator over the whole mesh, as the CLI's
    engine = Engine(args.checkpoint, precision=args.precision)
    cfg, params, step, mesh = engine.cfg, engine.params, engine.step, engine.translator.mesh
    translator = search.Translator(cfg, engine.translator.graphdef, engine.translator.tok, mesh)
    server = engine.decoders[0]
    multiple = len(mesh.devices.flat)
    with gzip.open(ROOT / "data" / "multi30k" / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    plans = [("one bucket a batch", True)] + ([("mixed buckets", False)] if args.mixed else [])
    precision = search.settings_from(cfg, precision=args.precision).precision
    print(f"checkpoint step {step}, precision {precision}, {multiple} device(s), {len(lines)} lines")
    print("plan                 beam  rows          grouping              lines that differ from the file")
    for plan_name, one_bucket in plans:
        for beam in [int(b) for b in args.beams.split(",")]:
            settings = search.settings_from(cfg, beam_size=beam, precision=precision)
            # plan_batches(one_bucket=...): translate's plan (and the server's), or the mixed one
            reference = [h[0][0] for h in translator.translate_lines(params, lines, settings, one_bucket=one_bucket)]
            for rows_name, t, p, s in [("translate's", translator, params, settings),
                                       ("server's", server.translator, server.params, engine.settings(beam_size=beam))]:
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    out, start, t0 = [], 0, time.perf_counter()
                    while start < len(lines):
                        size = int(rng.integers(1, args.max_group + 1))
                        out += [h[0][0] for h in t.translate_lines(p, lines[start:start + size], s,
                                                                   one_bucket=one_bucket)]
                        start += size
                    differ = [k + 1 for k, (a, b) in enumerate(zip(out, reference)) if a != b]
                    print(f"{plan_name:20s} {beam:4d}  {rows_name:12s}  groups of 1-{args.max_group}, seed {seed}  "
                          f"{len(differ):4d} {differ[:8]}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
