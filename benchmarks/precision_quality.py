"""What each decoding precision costs in quality: BLEU, chrF and the share of output lines that
differ from float32's, on a run's test set (data.test_files), in one process.

    python benchmarks/precision_quality.py --checkpoint RUN [--beams 1,4] [--precisions float32,bf16,int8]

float32 is the reference (the first of --precisions). Writes one JSON line per (beam, precision).
"""

from __future__ import annotations

import argparse
import json
import time

from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from
from transformer_mt.metrics import corpus_scores
from transformer_mt.textio import read_lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: as translate picks it)")
    p.add_argument("--beams", default="4", help="comma-separated beam sizes")
    p.add_argument("--precisions", default="float32,bf16,int8", help="comma-separated; the first is the reference")
    p.add_argument("--cpu-devices", type=int, default=2, help="as translate's --cpu-devices")
    args = p.parse_args()
    from transformer_mt.sharding import split_cpu

    split_cpu(args.cpu_devices)
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, False)
    src_file, ref_file = cfg.data.test_files
    sources, refs = read_lines(src_file), read_lines(ref_file)
    translator = Translator(cfg, graphdef, tok, mesh)
    for beam in (int(b) for b in args.beams.split(",")):
        reference = None
        for precision in args.precisions.split(","):
            settings = settings_from(cfg, beam_size=beam, precision=precision)
            t0 = time.perf_counter()
            hyps = [h[0][0] for h in translator.translate_lines(params, sources, settings, progress=False)]
            seconds = time.perf_counter() - t0
            reference = hyps if reference is None else reference
            scores = corpus_scores(hyps, refs)
            changed = sum(a != b for a, b in zip(hyps, reference)) / len(hyps)
            print(json.dumps({"checkpoint": args.checkpoint, "step": step, "test": src_file, "beam": beam,
                              "precision": precision, "bleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2),
                              "changed_lines": round(changed, 4), "seconds_with_compiles": round(seconds, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
