"""`translate`: a file or stdin through a trained run's Translator, one output line per input line.

Whatever the input, the output has exactly one line per input line (n lines per input line
with --nbest n), in input order.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys

from tqdm import tqdm

from transformer_mt.alignment import align_hypotheses
from transformer_mt.config import ConfigError
from transformer_mt.rundir import load_run
from transformer_mt.search import SearchSettings, Translator, settings_from_args
from transformer_mt.textio import iter_line_chunks, open_output, warn

FILE_CHUNK_LINES = 20000  # lines of a file sorted and decoded together: plenty to fill every batch


def translate_command(args) -> int:
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
    translator = Translator(cfg, graphdef, tok, mesh)
    settings = settings_from_args(cfg, args)
    # Scores are printed with --nbest only: a greedy search can skip them (the same translations).
    settings = dataclasses.replace(settings, scores=settings.nbest > 1)
    n_lines = translate_stream(translator, params, settings, args.input, args.output,
                               args.buffer_lines, progress=not args.no_progress, prefix=args.prefix,
                               alignment=args.alignment)
    devices = translator.mesh.devices.flat
    print(f"translated {n_lines} line(s) with checkpoint step {step} on {len(devices)} {devices[0].platform} "
          "device(s)", file=sys.stderr)
    return 0


def translate_stream(translator: Translator, params, settings: SearchSettings, input: str, output: str,
                     buffer_lines: int = 0, progress: bool = False, prefix: str | None = None,
                     alignment: bool = False) -> int:
    """Translates file or stdin ('-') `input` into `output`; returns the number of input lines.

    The input is read and translated in chunks of buffer_lines (default: one line from a
    terminal, 2000 from a pipe, FILE_CHUNK_LINES from a file), so memory stays bounded whatever
    its length and a pipe gets its lines back as it goes. Each chunk is sorted by length inside
    and written back in input order. A file output is written to a temporary file and renamed
    once every line is translated, so a failed run never leaves half a file. `prefix` names a
    file of target prefixes read in step with the input (same number of lines). `alignment` appends
    each hypothesis' word alignment (alignment.py).
    """
    translator.truncated = 0
    if not buffer_lines:
        buffer_lines = FILE_CHUNK_LINES if input != "-" else (1 if sys.stdin.isatty() else 2000)
    name = "stdin" if input == "-" else input
    n_lines = 0
    chunks = iter_line_chunks(input, buffer_lines)
    head = next(chunks, None)  # a missing or unreadable input fails here, before any output exists
    with open_output(output) as out:
        bar = tqdm(disable=not progress, desc="translate", unit="line", dynamic_ncols=True, file=sys.stderr)
        prefix_chunks = iter_line_chunks(prefix, buffer_lines) if prefix else None
        for first, lines in itertools.chain([head] if head else [], chunks):
            prefixes = None
            if prefix_chunks is not None:
                prefixes = next(prefix_chunks, (first, []))[1]
                if len(prefixes) != len(lines):
                    raise ConfigError(f"--prefix {prefix} has fewer lines than {name} (line {first + len(prefixes)})")
            results = translator.translate_lines(params, lines, settings, progress=False, name=name,
                                                 first_line=first, prefixes=prefixes)
            aligned = align_hypotheses(translator, params, lines, results) if alignment else [None] * len(results)
            out.write("".join("\n".join(format_hypotheses(n_lines + k, hyps, settings.nbest, aligned[k])) + "\n"
                              for k, hyps in enumerate(results)))
            out.flush()
            n_lines += len(lines)
            bar.update(len(lines))
        bar.close()
        if prefix_chunks is not None and next(prefix_chunks, None) is not None:
            raise ConfigError(f"--prefix {prefix} has more lines than {name} ({n_lines})")
    if translator.truncated:
        warn(f"{translator.truncated} of {n_lines} line(s) were longer than {translator.buckets[-1]} tokens "
             "and translated from their beginning (raise data.bucket_lengths in training for longer inputs)")
    return n_lines


def format_hypotheses(index: int, hyps: list[tuple[str, float]], nbest: int,
                      alignments: list[str] | None = None) -> list[str]:
    """The output lines of input line `index` (from 0): the best text alone, or with nbest > 1
    'index ||| text ||| score' per hypothesis; with alignments, each line ends in ' ||| ' + its
    alignment."""
    lines = [hyps[0][0]] if nbest == 1 else [f"{index} ||| {text} ||| {score:.4f}" for text, score in hyps]
    if alignments is not None:
        lines = [f"{line} ||| {a}" for line, a in zip(lines, alignments)]
    return lines
