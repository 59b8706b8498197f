"""`transformer-mt translate` on a file against CTranslate2 translating the same file, as users run
them: whole processes, from launch to the last line written, alternated in rounds.

    python benchmarks/cli_vs_ct2.py --checkpoint RUN --input FILE [--beams 1,4] [--rounds 3] [--fixed 32]

- ours: `transformer-mt translate --checkpoint RUN -i FILE -o OUT --beam B --no-progress`
  (2 CPU devices, the CLI's default for files; compile cache on, filled by an untimed first run);
- CTranslate2 at its best on 2 cores: the run exported with `transformer-mt export` (float32 and
  int8, untimed), then a Python process that loads it and runs `Translator.translate_file` with
  SentencePiece tokenize/detokenize functions, `inter_threads=2, intra_threads=1`,
  `max_batch_size=32` examples (the peers' setting), lines sorted within each read batch.
`--fixed N` (default 32): every sentence gets exactly N output tokens (ours max_len_a 0 /
max_len_b N with the EOS, CTranslate2 min = max_decoding_length = N - 1): the peers' setting,
for 1-step runs that never stop early. `--fixed 0`: each at its own length limit (trained runs).
Prints seconds and lines/s per system, and ours / CTranslate2 int8 per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CT2_SCRIPT = r"""
import json, sys, time
import ctranslate2, sentencepiece as spm
model, src, out, beam, fixed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
meta = json.load(open(model + "/tokenize.json"))
sp_src = spm.SentencePieceProcessor(model_file=model + "/" + meta["source_spm"])
sp_tgt = spm.SentencePieceProcessor(model_file=model + "/" + meta["target_spm"])
translator = ctranslate2.Translator(model, device="cpu", inter_threads=2, intra_threads=1)
limits = dict(min_decoding_length=fixed - 1, max_decoding_length=fixed - 1) if fixed else {}
translator.translate_file(src, out, max_batch_size=32, beam_size=beam, length_penalty=0,
                          source_tokenize_fn=lambda line: sp_src.encode(line, out_type=str),
                          target_detokenize_fn=lambda pieces: sp_tgt.decode(pieces), **limits)
"""


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--beams", default="1,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fixed", type=int, default=32)
    p.add_argument("--precision", default=None, help="ours: --precision (default: the run's, auto)")
    p.add_argument("--ct2-types", default="float32,int8",
                   help="CTranslate2 compute types to run (int8 alone halves a long comparison)")
    p.add_argument("--json-out")
    args = p.parse_args()
    n_lines = sum(1 for _ in open(args.input, encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="cli-vs-ct2-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    models = {}
    for q in args.ct2_types.split(","):
        models[q] = work / f"ct2-{q}"
        subprocess.run([sys.executable, "-m", "transformer_mt.cli", "export", "--checkpoint", args.checkpoint,
                        "--format", "ctranslate2", "--quantization", q, "-o", str(models[q])],
                       check=True, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    script = work / "ct2_file.py"
    script.write_text(CT2_SCRIPT)
    print(f"{n_lines} lines of {args.input}; fixed {args.fixed or 'off (own limits)'}; rounds {args.rounds}")
    figures = {}
    for beam in [int(b) for b in args.beams.split(",")]:
        ours = [sys.executable, "-m", "transformer_mt.cli", "translate", "--checkpoint", args.checkpoint, "-i",
                args.input, "-o", str(work / "ours.out"), "--beam", str(beam), "--no-progress"]
        if args.fixed:
            ours += ["--max-len-a", "0", "--max-len-b", str(args.fixed)]
        if args.precision:
            ours += ["--precision", args.precision]
        systems = {"ours": ours}
        for q, model in models.items():
            systems[f"ct2 {q}"] = [sys.executable, str(script), str(model), args.input, str(work / f"{q}.out"),
                                   str(beam), str(args.fixed)]
        for cmd in systems.values():  # untimed: fills our compile cache, warms the page cache
            timed(cmd, env)
        times = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, cmd in systems.items():
                times[name].append(timed(cmd, env))
            print(f"  beam {beam} round: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items())
                  + "".join(f"; ours / {n} {t[-1] / times['ours'][-1]:.2f}x" for n, t in times.items() if n != "ours"),
                  flush=True)
        med = {name: statistics.median(t) for name, t in times.items()}
        figures[beam] = {name: n_lines / s for name, s in med.items()}
        print(f"beam {beam}: " + ", ".join(f"{name} {n_lines / s:.1f} lines/s" for name, s in med.items())
              + "".join(f"; ours / {name} {med[name] / med['ours']:.2f}x" for name in med if name != "ours"),
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
