"""Decoding throughput of a trained run: sentences/s for greedy and beam search.

    python benchmarks/decode_speed.py --checkpoint runs/multi30k --sentences 500

Translates the first N validation sentences of the run's config twice per setting (the first
pass compiles), and reports the second.
"""

from __future__ import annotations

import argparse
import time

from transformer_mt import data as data_lib
from transformer_mt import translate as tr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument("--beams", default="1,4", help="comma-separated beam sizes")
    args = p.parse_args()
    cfg, graphdef, params, tok, step, mesh = tr.load_run(args.checkpoint)
    src, _ = data_lib.load_split(cfg.data, "valid")
    src = src[: args.sentences]
    translator = tr.Translator(cfg, graphdef, tok, mesh)
    for beam in (int(b) for b in args.beams.split(",")):
        settings = tr.settings_from(cfg, beam_size=beam)
        tr.translate_lines(translator, params, src, settings, progress=False)  # compile
        t0 = time.time()
        out = tr.translate_lines(translator, params, src, settings, progress=False)
        seconds = time.time() - t0
        words = sum(len(h[0][0].split()) for h in out)
        print(f"beam {beam}: {len(src) / seconds:,.1f} sentences/s ({len(src)} sentences, "
              f"{words / len(src):.1f} output words/sentence, checkpoint step {step})")


if __name__ == "__main__":
    main()
