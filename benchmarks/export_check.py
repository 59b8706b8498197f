"""A trained run against its CTranslate2 export on all test_2016 lines (issue 24's targets).

    python benchmarks/export_check.py --checkpoint RUN [--workdir DIR] [--json-out out.json]

Exports RUN with `transformer-mt export` (float32 and int8), translates the run's test source
with `transformer-mt translate` (greedy; beam 4 with --alpha 0; beam 4 with the config's alpha)
and with CTranslate2 as transformer_mt/export_check.py decodes, and reports: lines that differ
(and for each, our model's log-probabilities of both outputs: a tie when within 1e-5),
CTranslate2's teacher-forced log-probabilities against ours (references and our greedy outputs),
and BLEU / chrF (sacreBLEU) of every output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import ctranslate2
import numpy as np
import sacrebleu

from transformer_mt import export_check
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from
from transformer_mt.textio import clean_line, read_lines

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "transformer_mt.cli", *args], cwd=ROOT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: as translate picks)")
    p.add_argument("--workdir", help="where the exports and outputs go (default: a temporary directory)")
    p.add_argument("--json-out")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-check-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, graphdef, params, tok, step, _ = load_run(args.checkpoint, args.step)
    which = ["--checkpoint", args.checkpoint, "--step", str(step)]
    src_file, ref_file = (str(f) for f in cfg.data.test_files)
    lines = [clean_line(x) for x in read_lines(src_file)]
    refs = [x.strip() for x in read_lines(ref_file)]
    pieces = [tok.src.encode(x, out_type=str) for x in lines]
    assert max(map(len, pieces)) < cfg.data.bucket_lengths[-1], "a line would be cut by our translate"
    src_ids = tok.encode_src(lines)
    report = {"checkpoint": args.checkpoint, "step": step, "lines": len(lines), "ctranslate2": ctranslate2.__version__}

    models = {}
    for quant in ("float32", "int8"):
        models[quant] = work / f"ct2-{quant}"
        if not models[quant].exists():
            cli("export", *which, "--quantization", quant, "-o", str(models[quant]))
    alpha = cfg.decode.alpha
    runs = {"greedy": (1, 0.0, 0.0), "beam4_alpha0": (4, 0.0, 0.0), f"beam4_alpha{alpha}": (4, alpha, 1.0)}
    outputs = {}
    for name, (beam, a, length_penalty) in runs.items():
        out = work / f"ours-{name}.de"
        cli("translate", *which, "-i", src_file, "-o", str(out), "--beam", str(beam),
            "--alpha", str(a), "--no-progress")
        outputs[f"ours/{name}"] = read_lines(str(out))
        for quant, model in models.items():
            ct2 = ctranslate2.Translator(str(model), compute_type=quant, inter_threads=2, intra_threads=1)
            settings = settings_from(cfg, beam_size=beam, alpha=a)
            hyps = export_check.ct2_translate(ct2, pieces, settings, beam, length_penalty=length_penalty)
            outputs[f"ct2_{quant}/{name}"] = [tok.tgt.decode(h) for h in hyps]

    ct2 = ctranslate2.Translator(str(models["float32"]), compute_type="float32", inter_threads=2, intra_threads=1)
    for name in runs:
        ours, theirs = outputs[f"ours/{name}"], outputs[f"ct2_float32/{name}"]
        differ = [i for i in range(len(lines)) if ours[i] != theirs[i]]
        detail = []
        if differ:
            a_ids = tok.encode_tgt([ours[i] for i in differ])
            b_ids = tok.encode_tgt([theirs[i] for i in differ])
            sub = [src_ids[i] for i in differ]
            la = export_check.our_token_logprobs(graphdef, params, sub, a_ids)
            lb = export_check.our_token_logprobs(graphdef, params, sub, b_ids)
            for i, x, y in zip(differ, la, lb):
                detail.append({"line": i + 1, "ours": ours[i], "ct2": theirs[i], "ours_logp": round(float(x.sum()), 6),
                               "ct2_logp": round(float(y.sum()), 6), "tie_1e-5": bool(abs(x.sum() - y.sum()) < 1e-5)})
        report[f"differ/{name}"] = {"count": len(differ), "lines": detail[:20]}
        print(f"{name}: {len(differ)} of {len(lines)} lines differ", file=sys.stderr)

    for what, targets in (("references", refs), ("ours_greedy", outputs["ours/greedy"])):
        t_pieces = [tok.tgt.encode(t, out_type=str) for t in targets]
        t_ids = [[tok.tgt.piece_to_id(x) for x in t] for t in t_pieces]
        ours = export_check.our_token_logprobs(graphdef, params, src_ids, t_ids)
        theirs = export_check.ct2_token_logprobs(ct2, pieces, t_pieces)
        diff = np.concatenate([np.abs(a - b) for a, b in zip(ours, theirs)])
        report[f"logprob_diff/{what}"] = {"tokens": int(diff.size), "max": float(diff.max()),
                                          "mean": float(diff.mean())}
        print(f"log-probs of {what}: max |diff| {diff.max():.2e} over {diff.size} tokens", file=sys.stderr)

    for key, hyps in outputs.items():
        bleu, chrf = sacrebleu.corpus_bleu(hyps, [refs]), sacrebleu.corpus_chrf(hyps, [refs])
        report[f"bleu/{key}"] = {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2)}
        print(f"{key:32s} BLEU {bleu.score:6.2f} chrF {chrf.score:6.2f}", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
