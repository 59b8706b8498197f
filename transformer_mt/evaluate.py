"""`evaluate`: sacreBLEU's BLEU and chrF of a hypothesis file, or of a run's translation of --src,
against --ref."""

from __future__ import annotations

import json

from transformer_mt.config import ConfigError
from transformer_mt.metrics import corpus_scores
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from_args
from transformer_mt.textio import read_lines, write_text


def evaluate_command(args) -> int:
    refs = read_lines(args.ref)
    if args.hyp:
        if args.checkpoint or args.src:
            raise ConfigError("give either --hyp, or --checkpoint with --src, not both")
        hyps = read_lines(args.hyp)
        hyp_name = args.hyp
    elif args.checkpoint and args.src:
        cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
        translator = Translator(cfg, graphdef, tok, mesh)
        sources = read_lines(args.src)
        if len(sources) != len(refs):
            raise ConfigError(f"{args.src} has {len(sources)} lines but {args.ref} has {len(refs)}")
        settings = settings_from_args(cfg, args)
        hyps = [h[0][0] for h in translator.translate_lines(params, sources, settings, not args.no_progress,
                                                            name=args.src)]
        if args.output:
            write_text(args.output, "".join(h + "\n" for h in hyps))
        hyp_name = f"{args.checkpoint} (step {step})"
    else:
        raise ConfigError("evaluate needs --hyp FILE, or --checkpoint RUN_DIR with --src FILE")
    if len(hyps) != len(refs):
        raise ConfigError(f"{hyp_name} has {len(hyps)} lines but {args.ref} has {len(refs)}")
    scores = corpus_scores(hyps, refs)
    if args.json:
        print(json.dumps({"hyp": hyp_name, "ref": args.ref, "lines": len(refs), **scores}))
    else:
        print(f"BLEU = {scores['bleu']:.2f}  {scores['bleu_signature']}")
        print(f"chrF = {scores['chrf']:.2f}  {scores['chrf_signature']}")
    return 0
