"""Command line: `transformer-mt train | translate | evaluate | score | average | plot | attention | export | serve`.
Argument parsing only.

User errors (bad config, missing files, bad checkpoints) end with one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

EXIT_USER_ERROR = 2
DECODING_COMMANDS = ("translate", "evaluate", "serve")  # these run host_memory.keep_freed_memory
# Commands that leave nothing running when they return: the console command exits at once after
# them instead of tearing down jax, XLA and orbax module by module (0.3-0.5 s of each run).
QUICK_EXIT_COMMANDS = ("translate", "evaluate", "score")
DECODE_CPU_DEVICES = 2  # default of --cpu-devices (sharding.split_cpu)
DECODE_PRECISIONS = ("auto", "float32", "bf16", "int8")  # --precision (config: decode.precision)
EXIT_INTERRUPTED = 130


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (or resume a run)",
        description="Train an encoder-decoder Transformer. Writes the resolved config, the SentencePiece "
        "model, checkpoints, metrics.jsonl and TensorBoard events into --workdir.",
        epilog="SIGTERM or SIGINT saves a checkpoint and exits with 143 or 130; --resume continues exactly. "
        "Exit codes: 0 done, 1 stopped on a non-finite loss (train.on_nonfinite=stop), 2 error "
        "(one line on stderr: bad config, missing file, checkpoint that cannot be written, --init-from model of other "
        "shapes).",
    )
    add_train_arguments(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML experiment config (e.g. configs/multi30k_en_de.yaml); "
                   "optional with --resume, which then reuses WORKDIR/config.yaml")
    p.add_argument("--workdir", required=True, help="run directory for checkpoints, tokenizer, logs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set model.num_encoder_layers=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --workdir")
    p.add_argument("--init-from", metavar="RUN[/STEP]",
                   help="fine-tune: start from this run's parameters (its best checkpoint, else its last; or STEP) "
                   "and tokenizer, with a fresh optimizer and step 0; the model's array shapes must match. "
                   "Ignored once --workdir has checkpoints (so --resume continues the fine-tuning run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def add_checkpoint_arguments(p: argparse.ArgumentParser, required: bool = True, purpose: str = "") -> None:
    """--checkpoint RUN_DIR with --step / --last, shared by every command that reads a run."""
    p.add_argument("--checkpoint", required=required, metavar="RUN_DIR",
                   help=f"run directory written by `train` or `average`{purpose}")
    p.add_argument("--step", type=int, help="checkpoint step (default: the best-BLEU checkpoint if any, else the last)")
    p.add_argument("--last", action="store_true", help="use the last checkpoint even when a best one exists")


def _add_translate(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate a file or stdin with a trained run",
        description="Translate text, one sentence per line. Writes exactly one output line per input line, "
        "in input order (an empty input line gives an empty output line).",
    )
    add_checkpoint_arguments(p)
    p.add_argument("-i", "--input", default="-", help="input file, or - for stdin (default)")
    p.add_argument("-o", "--output", default="-", help="output file, or - for stdout (default)")
    add_decode_arguments(p)
    p.add_argument("--nbest", type=int, default=1,
                   help="write the N best hypotheses per line as 'index ||| hypothesis ||| score' lines")
    p.add_argument("--alignment", action="store_true",
                   help="append ' ||| ' and a word alignment to every output line: 'i-j' pairs (source word i, "
                   "output word j; words split at whitespace, counted from 0), one per output word, naming the "
                   "source word it attends to most in the last decoder layer's cross-attention (mean over heads)")
    p.add_argument("--prefix", metavar="FILE",
                   help="target prefixes, one per input line (an empty line: none): each translation starts with "
                   "its prefix (forced, then searched freely); greedy, beam and sampling")
    p.add_argument("--buffer-lines", type=int, default=0,
                   help="lines read and translated together (default: 1 on a terminal, 2000 from a pipe, "
                   "20000 from a file); memory stays bounded whatever the input's length")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, help="beam size (1 = greedy; default from the run's config)")
    p.add_argument("--alpha", type=float, help="GNMT length penalty exponent (default from config)")
    p.add_argument("--max-len-a", type=float, help="output length limit a * src_len + b: a")
    p.add_argument("--max-len-b", type=int, help="output length limit a * src_len + b: b")
    p.add_argument("--batch-tokens", type=int, help="padded source tokens per decoding batch")
    p.add_argument("--precision", choices=DECODE_PRECISIONS,
                   help="matmul inputs: float32 (exact); bf16 (float32 sums); int8 (per-channel scales). auto: "
                   "int8 where our int8 kernel runs (AVX512-VNNI and a C++ compiler; README, Precision); else, on "
                   "CPUs with AVX512-BF16/AMX, int8 for models of d_model >= 512 and bf16 below; float32 elsewhere. "
                   "Default: the run's decode.precision (auto). "
                   "Measured cost in BLEU and speed: benchmarks/RESULTS.md")
    p.add_argument("--sampling", metavar="topk:K|topp:P",
                   help="sample instead of searching: from the K most likely tokens, or from the smallest set "
                   "holding probability P (nucleus); --nbest N draws N samples per line, best first; scores are "
                   "the model's log-probabilities")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0; lower is greedier)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0): the same seed draws the same samples, "
                   "whatever the batching")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help=f"on a CPU, split it into N devices (at most one per core) that decode the rows of each "
                   f"batch side by side: 1.2-1.4x the sentences/s of one device on 2 cores. Default: "
                   f"{DECODE_CPU_DEVICES} when translating a file, 1 for stdin (a pipe's first line comes ~0.4 s "
                   "sooner on one). No effect on GPUs and TPUs or when XLA_FLAGS sets "
                   "--xla_force_host_platform_device_count. The translations are the same")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score translations with sacreBLEU (BLEU, chrF)",
        description="Either score --hyp against --ref, or translate --src with --checkpoint and score "
        "against --ref. Prints BLEU and chrF with their sacreBLEU signatures.",
    )
    p.add_argument("--hyp", help="hypothesis file (one line per reference line)")
    p.add_argument("--ref", required=True, help="reference file")
    add_checkpoint_arguments(p, required=False, purpose=" to translate --src with")
    p.add_argument("--src", help="source file to translate (with --checkpoint)")
    p.add_argument("--output", help="also write the translations of --src here")
    add_decode_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="log-probability of given translations under a trained run",
        description="Score each --tgt line as a translation of the same --src line by teacher forcing. "
        "Prints one line per input line: total log-probability, per token, and length-normalised, "
        "tab-separated. Tokens count the end-of-sentence token; normalised = total / ((5 + tokens) / 6) ** alpha, "
        "the GNMT length penalty beam search ranks by. Empty lines are scored as empty sentences.",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--src", required=True, help="source file (one sentence per line; - for stdin)")
    p.add_argument("--tgt", required=True, help="target file with as many lines as --src")
    p.add_argument("-o", "--output", default="-", help="output file, or - for stdout (default)")
    p.add_argument("--alpha", type=float, help="length penalty exponent of the normalised score (default from config)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per scoring batch (default: data.batch_tokens)")


def _add_average(sub) -> None:
    p = sub.add_parser(
        "average",
        help="average the parameters of several checkpoints into a new run directory",
        description="Average the parameters of the last N (or the N best by validation BLEU) checkpoints of a "
        "run. The output is a run directory (config and tokenizer copied, one checkpoint) that translate, "
        "evaluate and score take as --checkpoint; OUT_RUN/averaged.json lists the averaged checkpoints. "
        "Training keeps train.keep_checkpoints checkpoints: raise it to average more.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory written by `train`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="N",
                       help="the N newest checkpoints (default: all in RUN/checkpoints)")
    which.add_argument("--best", type=int, metavar="N",
                       help="the N checkpoints on disk with the highest validation BLEU (train.bleu_every)")
    p.add_argument("-o", "--output", metavar="OUT_RUN",
                   help="new run directory to write (default: RUN-avg-lastN or RUN-avg-bestN beside RUN)")


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="plot training curves of one or more runs",
        description="Plot training and validation loss and validation BLEU against steps and wall time from "
        "each run's metrics.jsonl, all runs in one figure. Needs matplotlib: pip install 'transformer_mt[plot]'.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by `train`")
    p.add_argument("-o", "--output", default="curves.png", help="image file: .png, .pdf or .svg (default: curves.png)")


def _add_attention(sub) -> None:
    p = sub.add_parser(
        "attention",
        help="draw a sentence's attention weights (every layer and head) into an image",
        description="Draw the cross-attention weights of every decoder layer and head for one sentence, as a grid "
        "of heatmaps (rows: layers, columns: heads; source pieces across, target pieces down), over the model's "
        "greedy translation or --tgt. Row t is the decoder step that outputs target piece t. "
        "Needs matplotlib: pip install 'transformer_mt[plot]'.",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--src", required=True, metavar="TEXT", help="source sentence")
    p.add_argument("--tgt", metavar="TEXT", help="target sentence to force (default: the model's greedy translation)")
    p.add_argument("--self", dest="self_attention", action="store_true",
                   help="also draw encoder and decoder self-attention")
    p.add_argument("-o", "--output", default="attention.png",
                   help="image file: .png, .pdf or .svg (default: attention.png)")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a CTranslate2 model directory (int8 included)",
        description="Convert a checkpoint to a CTranslate2 model directory: the model, the SentencePiece model(s) "
        "and tokenize.json (how text becomes pieces), enough to translate with ctranslate2.Translator and "
        "sentencepiece alone. Needs ctranslate2: pip install 'transformer_mt[export]'. DIR appears whole or "
        "not at all.",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--format", default="ctranslate2", choices=["ctranslate2"], help="output format (default: ctranslate2)")
    p.add_argument("--quantization", default="float32", choices=["float32", "int8", "int8_float32", "int16"],
                   help="weight type of the exported model (default: float32)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create (must not exist)")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="translate over HTTP: LibreTranslate's API, /v1/translate, a web page",
        description="Serve a trained run over HTTP: LibreTranslate's POST /translate and GET /languages, "
        "POST /v1/translate with every search option of `translate`, GET /health, and a web page at /. "
        "Concurrent requests are decoded together; each answer is what `translate` gives for its lines. "
        "Needs the optional extra: pip install 'transformer_mt[serve]'.",
        epilog="SIGTERM or SIGINT stops accepting, answers the requests in flight, and exits 0.",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--batch-tokens", type=int, help="padded source tokens a batching cycle takes at most "
                   "(default: the run's decode.batch_tokens); a cycle is decoded in length-sorted batches of at "
                   "most 512 source tokens x hypotheses (beam or nbest draws)")
    p.add_argument("--max-wait-ms", type=float, default=3.0,
                   help="when idle, how long the first request waits for others to share its batch (default 3)")
    p.add_argument("--pool-rows", type=int, default=0, metavar="N",
                   help="continuous batching under heavy load (default 0: off; e.g. 64): from 48 lines in the "
                   "server until it holds 16, greedy requests with the server's settings are decoded in a pool "
                   "of N rows a few steps at a time, each finished row refilled from the queue at once, instead "
                   "of in batches that run until their longest line ends. A pool line is padded to 32 source tokens, so "
                   "at int8 a near-tie can differ from translate's answer (a batch pads it to its own bucket); "
                   "on a 2-core CPU "
                   "0.7x the sentences/s of batches at 64 clients (benchmarks/RESULTS.md). Lines over 32 "
                   "source tokens and other settings go by batches")
    p.add_argument("--pool-steps", type=int, default=8, metavar="N",
                   help="greedy steps the row pool takes between two refills of its rows (default 8): fewer "
                   "answers a finished line sooner, at one more call to the devices every N steps")
    p.add_argument("--max-chars", type=int, default=5000, help="characters per request (default 5000; more: 413)")
    p.add_argument("--max-lines", type=int, default=100, help="lines per request (default 100; more: 413)")
    p.add_argument("--max-queue-lines", type=int, default=2000,
                   help="lines waiting to be decoded (default 2000; more: 503 with Retry-After)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait (default 30; then 504)")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help=f"on a CPU, split it into N devices (default {DECODE_CPU_DEVICES}), each decoding batching "
                   "cycles of its own with its own copy of the compiled programs (with --pool-rows: every "
                   "batch's rows split over them)")
    p.add_argument("--precision", choices=DECODE_PRECISIONS,
                   help="matmul inputs while decoding, as translate --precision (default: the run's "
                   "decode.precision, auto). Each line is decoded in a batch of its own length bucket, as "
                   "translate batches a file: int8 and float32 answers equal translate's line for line, bf16 ones "
                   "can differ on a near-tie (a row's sums move with the rows beside it)")
    p.add_argument("--hold-while-exists", metavar="FILE", help=argparse.SUPPRESS)  # tests: queue, don't decode


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR",
                   help="persistent cache of compiled programs and trained tokenizers, so the next run of the "
                   "same model starts in seconds (default: $JAX_COMPILATION_CACHE_DIR, else "
                   "~/.cache/transformer_mt/jax)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile every program afresh, cache nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-mt",
        description="Transformer neural machine translation in JAX/Flax: train, translate, evaluate, score, "
        "average checkpoints, plot training curves and attention, export to CTranslate2.",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,translate,evaluate,score,average,plot,attention,export,serve}")
    _add_train(sub)
    _add_translate(sub)
    _add_evaluate(sub)
    _add_score(sub)
    _add_average(sub)
    _add_plot(sub)
    _add_attention(sub)
    _add_export(sub)
    _add_serve(sub)
    for name, p in sub.choices.items():
        if name not in ("average", "plot", "export"):  # these compile nothing
            add_cache_arguments(p)
    return parser


def run_train(args) -> int:
    from transformer_mt import config as config_lib
    from transformer_mt.trainer import Interrupted, train

    cfg = config_lib.load(args.config, args.overrides) if args.config else None
    if cfg is None and not args.resume:
        raise config_lib.ConfigError("--config is required unless --resume continues an existing run")
    try:
        result = train(cfg, args.workdir, resume=args.resume, overrides=args.overrides,
                       progress_bar=not args.no_progress, init_from=args.init_from)
    except Interrupted as e:
        print(f"transformer-mt train: {e}; nothing half-built was left", file=sys.stderr)
        return 128 + signal.Signals[e.signal_name].value
    reason = result.get("stop_reason") or ""
    if reason.startswith("signal "):
        # Preempted: the checkpoint is saved; a non-zero code tells a job script to resubmit.
        sig = signal.Signals[reason.split()[1]]
        print(f"transformer-mt train: {sig.name} received: checkpoint saved at step {result['step']}; "
              "the same command with --resume continues", file=sys.stderr)
        return 128 + sig.value
    return 0


# Each command's module is imported only when it runs, so `--help` and errors stay quick.
COMMANDS = {
    "translate": ("transformer_mt.translate", "translate_command"),
    "evaluate": ("transformer_mt.evaluate", "evaluate_command"),
    "score": ("transformer_mt.score", "score_command"),
    "average": ("transformer_mt.average", "average_command"),
    "plot": ("transformer_mt.plot", "plot_command"),
    "attention": ("transformer_mt.attention", "attention_command"),
    "export": ("transformer_mt.export", "export_command"),
    "serve": ("transformer_mt.serve", "serve_command"),
}


def run_command(args) -> int:
    if args.command == "train":
        return run_train(args)
    module, function = COMMANDS[args.command]
    return getattr(importlib.import_module(module), function)(args)


def main(argv: list[str] | None = None, quick_exit: bool = False) -> int:
    """Runs one command; its exit code. quick_exit (the console command): after a command of
    QUICK_EXIT_COMMANDS, flush stdout and stderr and end the process here (os._exit)."""
    args = build_parser().parse_args(argv)
    code = _main(args)
    if quick_exit and args.command in QUICK_EXIT_COMMANDS:
        exit_now(code)
    return code


def console() -> None:
    """The `transformer-mt` command."""
    sys.exit(main(quick_exit=True))


def exit_now(code: int) -> None:
    """Ends the process with `code` once stdout and stderr are flushed, skipping the interpreter's
    teardown: every file a command writes is closed (and renamed into place) before it returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream already closed
            pass
    os._exit(code)


def _main(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from transformer_mt.checkpoint import CheckpointWriteError, quiet_orbax_background_errors
    from transformer_mt.config import ConfigError
    from transformer_mt.trainer import TrainingStopped

    from transformer_mt import compile_cache

    quiet_orbax_background_errors()
    if args.command in DECODING_COMMANDS:
        from transformer_mt.host_memory import keep_freed_memory

        keep_freed_memory()
    if hasattr(args, "cpu_devices"):
        from transformer_mt.sharding import split_cpu

        reads_file = args.command in ("evaluate", "serve") or getattr(args, "input", "-") != "-"
        split_cpu(args.cpu_devices or (DECODE_CPU_DEVICES if reads_file else 1))  # before JAX's backends start
    if hasattr(args, "compile_cache"):
        compile_cache.enable(args.compile_cache, disabled=args.no_compile_cache)

    try:
        return run_command(args)
    except (ConfigError, CheckpointWriteError) as e:
        print(f"transformer-mt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        print(f"transformer-mt {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"transformer-mt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"transformer-mt {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    console()
