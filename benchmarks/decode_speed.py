"""Decoding speed of a trained run, in the peers' setting and at free length.

    python benchmarks/decode_speed.py --checkpoint runs/multi30k            # both settings
    python benchmarks/decode_speed.py --checkpoint RUN --fixed 32 --beams 1,4 --json-out out.json

Setting `fixed`: the first --sentences test_2016 source sentences (the run's data.test_files),
max_len_a=0, max_len_b=--fixed: the length the peers in ../shared/peers force (an untrained or
1-step run never ends early, so every sentence gets exactly that many tokens). Setting `free`:
the run's own length limit (a trained run stops at its end token). Token ids are prepared
beforehand, as the peers take pieces; the `end to end` figure adds tokenization and detokenization.
Searches run as `transformer-mt translate` runs them: greedy without log-probabilities (the
CLI prints scores only with --nbest), unless --scores.

For each beam size the first pass compiles (its time and the number of programs compiled are
reported separately); sentences/s and output tokens/s are the median of --passes further passes.
With several --precisions, their passes alternate (A B C A B C ...), so that the load of a shared
machine falls on each alike; compare them as ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import jax

from bench_util import CompileCounter
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from
from transformer_mt.textio import clean_line, read_lines


def output_tokens(results) -> int:
    """Generated tokens of the best hypotheses, the end token included (as the peers count)."""
    return sum(len(h[0][0]) + 1 for h in results if h)


def variant(precision: str):
    """(settings' precision, context to decode in): 'int8-xla' is int8 with the products in XLA
    rather than in int8_kernel's kernel (the same numbers; a comparison of speed)."""
    if precision == "int8-xla":
        from transformer_mt import int8_kernel

        return "int8", int8_kernel.disabled
    return precision, contextlib.nullcontext


def measure(translator, params, ids, lines, settings_list, passes, counter, contexts=None):
    """Figures for each of settings_list (each decoded inside its context), their timed passes alternated."""
    contexts = contexts or [contextlib.nullcontext] * len(settings_list)
    firsts, programs, times, results = [], [], [[] for _ in settings_list], [None] * len(settings_list)
    for settings, context in zip(settings_list, contexts):
        before = counter.count
        t0 = time.perf_counter()
        with context():
            translator.translate_ids(params, ids, settings)
        firsts.append(time.perf_counter() - t0)
        programs.append(counter.count - before)
    for _ in range(passes):
        for k, (settings, context) in enumerate(zip(settings_list, contexts)):
            t0 = time.perf_counter()
            with context():
                results[k] = translator.translate_ids(params, ids, settings)
            times[k].append(time.perf_counter() - t0)
    out = []
    for k, settings in enumerate(settings_list):
        t0 = time.perf_counter()
        with contexts[k]():
            translator.translate_lines(params, lines, settings, progress=False)
        end_to_end = time.perf_counter() - t0
        seconds = statistics.median(times[k])
        tokens = output_tokens(results[k])
        out.append({"sentences": len(ids), "sentences_per_s": len(ids) / seconds, "tokens_per_s": tokens / seconds,
                    "output_tokens": tokens, "seconds": seconds, "first_pass_s": firsts[k],
                    "compile_s": max(firsts[k] - seconds, 0.0), "programs": programs[k],
                    "end_to_end_sentences_per_s": len(ids) / end_to_end, "precision": settings.precision})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--sentences", type=int, default=200, help="first N test_2016 sentences (peers: 200)")
    p.add_argument("--beams", default="1,4", help="comma-separated beam sizes")
    p.add_argument("--fixed", type=int, default=32, help="output length of the fixed setting (0: skip it)")
    p.add_argument("--free", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure at the run's own length limit")
    p.add_argument("--passes", type=int, default=3, help="timed passes after the compiling one")
    p.add_argument("--batch-tokens", type=int, help="decode.batch_tokens override")
    p.add_argument("--precisions", default="auto",
                   help="comma-separated decoding precisions (auto, float32, bf16, int8; int8-xla: int8 products "
                   "in XLA, not in our kernel), passes alternated")
    p.add_argument("--compile-cache", action="store_true",
                   help="use the persistent compilation cache (default off: compile time is measured)")
    p.add_argument("--scores", action="store_true",
                   help="greedy search also computes each translation's log-probability (`translate` does only "
                   "with --nbest; without, the kernel picks each token without storing the logits)")
    p.add_argument("--source", help="source file (default: the run's data.test_files[0])")
    p.add_argument("--json-out", help="also write the figures here")
    p.add_argument("--cpu-devices", type=int, default=2,
                   help="as translate's --cpu-devices: split a CPU into N devices (default 2, the CLI's default)")
    args = p.parse_args()
    from transformer_mt.sharding import split_cpu

    split_cpu(args.cpu_devices)

    try:
        from transformer_mt import compile_cache
    except ImportError:  # code from before the cache (to measure it beside today's)
        compile_cache = None
    if compile_cache is not None:
        compile_cache.enable(disabled=not args.compile_cache)
    counter = CompileCounter()
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint)
    source = args.source or cfg.data.test_files[0]
    lines = read_lines(source)[: args.sentences]
    ids = tok.encode_src([clean_line(s) for s in lines])
    translator = Translator(cfg, graphdef, tok, mesh)
    settings = []
    if args.fixed:
        settings.append((f"fixed{args.fixed}", dict(max_len_a=0.0, max_len_b=args.fixed)))
    if args.free:
        settings.append(("free", {}))
    report = {"checkpoint": args.checkpoint, "step": step, "source": source, "device": str(jax.devices()[0]),
              "devices": len(jax.devices()), "results": {}}
    print(f"{len(lines)} sentences of {source}; checkpoint step {step}; {len(jax.devices())} x {jax.devices()[0]}",
          file=sys.stderr)
    for name, overrides in settings:
        for beam in (int(b) for b in args.beams.split(",")):
            names = args.precisions.split(",")
            variants = [variant(precision) for precision in names]
            many = [settings_from(cfg, beam_size=beam, batch_tokens=args.batch_tokens, precision=precision,
                                  scores=args.scores, **overrides) for precision, _ in variants]
            search = "greedy" if beam == 1 else f"beam{beam}"
            for label, r in zip(names, measure(translator, params, ids, lines, many, args.passes, counter,
                                               [context for _, context in variants])):
                label = r["precision"] if label == "auto" else label
                report["results"][f"{name}/{search}/{label}"] = r
                print(f"{name:8s} {search:7s} {label:8s} {r['sentences_per_s']:8.1f} sent/s "
                      f"{r['tokens_per_s']:9.0f} tok/s  compile {r['compile_s']:5.1f} s ({r['programs']} programs)  "
                      f"end to end {r['end_to_end_sentences_per_s']:.1f} sent/s  "
                      f"{r['output_tokens'] / len(ids):.1f} tokens/sentence", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
