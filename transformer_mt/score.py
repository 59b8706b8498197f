"""`score`: the model's log-probability of given targets, by teacher forcing (teacher_forcing.py).

Scores are those search reports: the sum of the target tokens' log-probabilities, EOS included,
and that sum over the GNMT length penalty.
"""

from __future__ import annotations

import sys

import numpy as np

from transformer_mt.config import ConfigError
from transformer_mt.decode import length_penalty
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator
from transformer_mt.textio import clean_line, read_lines, write_text


def score_command(args) -> int:
    """Writes `total<TAB>per_token<TAB>normalised` for each line pair of --src/--tgt."""
    sources, targets = read_lines(args.src), read_lines(args.tgt)
    if len(sources) != len(targets):
        raise ConfigError(f"{args.src} has {len(sources)} lines but {args.tgt} has {len(targets)}")
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
    alpha = cfg.decode.alpha if args.alpha is None else args.alpha
    translator = Translator(cfg, graphdef, tok, mesh)
    src_ids = tok.encode_src([clean_line(s) for s in sources])
    tgt_ids = tok.encode_tgt([clean_line(t) for t in targets])
    totals, counts = translator.score_ids(params, src_ids, tgt_ids, args.batch_tokens)
    normalised = totals / np.asarray(length_penalty(counts, alpha), np.float64)
    write_text(args.output, "".join(f"{t:.4f}\t{t / n:.4f}\t{z:.4f}\n" for t, n, z in zip(totals, counts, normalised)))
    print(f"scored {len(sources)} line pair(s) with checkpoint step {step}", file=sys.stderr)
    return 0
