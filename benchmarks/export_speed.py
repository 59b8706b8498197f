"""Decoding speed of a run against its CTranslate2 export (float32 and int8), back to back.

    python benchmarks/export_speed.py --checkpoint RUN [--sentences 200] [--rounds 3] [--json-out out.json]

In one process, the first --sentences test_2016 sources, pieces/ids prepared beforehand:
- ours: Translator.translate_ids (what `transformer-mt translate` runs), 2 CPU devices as the
  CLI's default for files; the compiling pass is not timed;
- CTranslate2 at its best on 2 cores: inter_threads=2, intra_threads=1, max_batch_size 32,
  one untimed warm-up call; float32 and int8.
Settings: `fixed32`: CTranslate2 min = max_decoding_length = 32, ours max_len_a=0,
max_len_b=32 (32 tokens with the forced EOS; a random-init or 1-step run never ends earlier);
`free`: each at its own limit (ours: the config's; CTranslate2: max_decoding_length=max_len_cap,
length_penalty 0). Each round times every system once, in turn; the figure is the median
over --rounds rounds. Output tokens per sentence are reported, to show both did the same work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ctranslate2

from transformer_mt import export
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from
from transformer_mt.sharding import split_cpu
from transformer_mt.textio import clean_line, read_lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--beams", default="1,4")
    p.add_argument("--settings", default="fixed32,free")
    p.add_argument("--json-out")
    args = p.parse_args()
    split_cpu(2)
    work = Path(tempfile.mkdtemp(prefix="export-speed-"))
    models = {q: export.export(args.checkpoint, work / q, quantization=q)[0] for q in ("float32", "int8")}
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint)
    lines = [clean_line(x) for x in read_lines(str(cfg.data.test_files[0]))[: args.sentences]]
    ids = tok.encode_src(lines)
    pieces = [tok.src.encode(x, out_type=str) for x in lines]
    translator = Translator(cfg, graphdef, tok, mesh)
    ct2 = {q: ctranslate2.Translator(str(m), device="cpu", compute_type=q, inter_threads=2, intra_threads=1)
           for q, m in models.items()}
    report = {"checkpoint": args.checkpoint, "step": step, "d_model": cfg.model.d_model, "sentences": len(lines),
              "ctranslate2": ctranslate2.__version__, "results": {}}
    for setting in args.settings.split(","):
        for beam in (int(b) for b in args.beams.split(",")):
            if setting == "free":
                ours_settings = settings_from(cfg, beam_size=beam, alpha=0.0)
                kw = dict(max_decoding_length=cfg.decode.max_len_cap, min_decoding_length=0)
            else:
                n = int(setting.removeprefix("fixed"))
                ours_settings = settings_from(cfg, beam_size=beam, alpha=0.0, max_len_a=0.0, max_len_b=n)
                kw = dict(max_decoding_length=n, min_decoding_length=n)
            kw.update(beam_size=beam, length_penalty=0.0, max_batch_size=32)

            def ours():
                res = translator.translate_ids(params, ids, ours_settings)
                return sum(len(h[0][0]) + 1 for h in res if h)  # the EOS counted, as the peers count

            def theirs(t):
                return sum(len(r.hypotheses[0]) for r in t.translate_batch(pieces, **kw))  # EOS not returned

            systems = {"ours": ours, **{f"ct2_{q}": (lambda t=t: theirs(t)) for q, t in ct2.items()}}
            tokens = {name: fn() for name, fn in systems.items()}  # compiles ours; warms CTranslate2
            times = {name: [] for name in systems}
            for _ in range(args.rounds):
                for name, fn in systems.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            search = "greedy" if beam == 1 else f"beam{beam}"
            for name in systems:
                seconds = statistics.median(times[name])
                r = {"sentences_per_s": round(len(lines) / seconds, 1), "seconds": round(seconds, 3),
                     "tokens_per_sentence": round(tokens[name] / len(lines), 2)}
                report["results"][f"{setting}/{search}/{name}"] = r
                print(f"{setting:8s} {search:7s} {name:12s} {r['sentences_per_s']:8.1f} sent/s "
                      f"{r['tokens_per_sentence']:6.2f} tokens/sentence", file=sys.stderr, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
