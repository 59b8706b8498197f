"""Test-set BLEU against training wall time: each checkpoint of a run, translated and scored.

    python benchmarks/time_to_quality.py --run runs/multi30k --minutes 15,30,60 --beam 4

A checkpoint's elapsed time is the wall-clock "time" of its step's record in RUN/metrics.jsonl
minus the run's start: --start (seconds since the epoch, e.g. `date +%s` just before launching
`train`), else the modification time of RUN/config.yaml, which `train` writes before it loads the
data (about 2 s after launch; later if the run was resumed). A run keeps only its last
`train.keep_checkpoints`; --checkpoints names a run directory holding copies of earlier ones.
For each --minutes mark the table names the newest checkpoint saved by then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformer_mt import compile_cache
from transformer_mt import data as data_lib
from transformer_mt import rundir
from transformer_mt.metrics import corpus_scores
from transformer_mt.search import Translator


def step_times(run: Path) -> dict[int, float]:
    """Step -> wall-clock time of its training record (the last one, if a resume repeated it)."""
    times = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a killed run's half-written last line
        if record.get("split") != "valid" and "time" in record:
            times[int(record["step"])] = float(record["time"])
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory whose metrics.jsonl gives the times")
    p.add_argument("--checkpoints", help="run directory whose checkpoints/ to score (default: --run)")
    p.add_argument("--start", type=float, help="launch time, seconds since the epoch")
    p.add_argument("--minutes", default="15,30,60", help="comma-separated marks")
    p.add_argument("--beam", type=int, help="beam size (default: the run's decode.beam_size)")
    p.add_argument("--alpha", type=float, help="length penalty (default: the run's decode.alpha)")
    p.add_argument("--json-out", help="also write the rows here")
    args = p.parse_args()

    compile_cache.enable()
    run = Path(args.run)
    source = Path(args.checkpoints or run)
    start = args.start if args.start is not None else (run / rundir.CONFIG_FILE).stat().st_mtime
    times = step_times(run)
    steps = sorted(int(d.name) for d in rundir.checkpoints_dir(source).iterdir() if d.name.isdigit())
    rows, translator = [], None
    for step in steps:
        if step not in times:
            print(f"step {step}: no training record in {run}/metrics.jsonl, skipped")
            continue
        cfg, graphdef, params, tok, _, mesh = rundir.load_run(source, step=step)
        if translator is None:
            translator = Translator(cfg, graphdef, tok, mesh)  # one set of compiled programs for all
            src, ref = data_lib.load_split(cfg.data, "test")
        beam = args.beam or cfg.decode.beam_size
        alpha = cfg.decode.alpha if args.alpha is None else args.alpha
        scores = corpus_scores(translator.translate(params, src, beam_size=beam, alpha=alpha), ref)
        rows.append({"step": step, "minutes": (times[step] - start) / 60, "bleu": scores["bleu"],
                     "chrf": scores["chrf"], "beam": beam, "alpha": alpha})
        print(f"step {step:>6}  {rows[-1]['minutes']:6.1f} min  BLEU {scores['bleu']:5.2f}  chrF {scores['chrf']:5.2f}",
              flush=True)
    if not rows:
        raise SystemExit(f"error: no checkpoint of {source} has a training record in {run}/metrics.jsonl")
    print(f"\n{source}: test {', '.join(cfg.data.test_files)}, beam {rows[0]['beam']}, alpha {rows[0]['alpha']}")
    print(f"BLEU signature: {scores['bleu_signature']}")
    print("\n| by minute | checkpoint (step, minute) | BLEU | chrF |\n|---:|---|---:|---:|")
    for mark in [float(m) for m in args.minutes.split(",") if m]:
        done = [r for r in rows if r["minutes"] <= mark]
        if done:
            r = done[-1]
            print(f"| {mark:g} | {r['step']} ({r['minutes']:.1f}) | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    r = rows[-1]
    print(f"| end | {r['step']} ({r['minutes']:.1f}) | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
