"""Text in and out for every command.

Reading the way `wc -l` counts: lines end at '\n' only, never at '\r', U+2028 or form feeds, so
parallel files stay aligned and every input line gets one output line. Invalid UTF-8 is replaced
(U+FFFD) with a warning naming the file and line. A line is cleaned (`clean_line`) before it is
tokenized, and an output text is made one line (`one_line`) before it is written. Output files
are written atomically (`open_output`): a failed run never leaves half a file.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from transformer_mt.config import ConfigError


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def decode_lines(raw_lines: Iterable[bytes], name: str, first_line: int = 1) -> Iterator[str]:
    """bytes lines -> str, invalid UTF-8 replaced with U+FFFD and a warning naming the line."""
    for n, raw in enumerate(raw_lines, start=first_line):
        raw = raw.rstrip(b"\n")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            warn(f"{name} line {n}: invalid UTF-8 replaced with U+FFFD")
            yield raw.decode("utf-8", errors="replace")


def _open_binary(path: str):
    """A binary stream of a file (.gz decompressed on the fly) or stdin ('-'), with one-line errors."""
    if path == "-":
        return sys.stdin.buffer
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConfigError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"input is a directory, not a file: {path}") from None
    except PermissionError:
        raise ConfigError(f"input file is not readable: {path}") from None
    return gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f


def iter_line_chunks(path: str, size: int) -> Iterator[tuple[int, list[str]]]:
    """(number of the chunk's first line, up to `size` lines) of a file or stdin, read as it goes,
    so memory stays bounded whatever the input's length; lines as `read_lines` splits them."""
    name = "stdin" if path == "-" else path
    stream = _open_binary(path)
    chunk: list[bytes] = []
    first = 1
    try:
        for raw in stream:
            chunk.append(raw)
            if len(chunk) >= size:
                yield first, list(decode_lines(chunk, name, first))
                first += len(chunk)
                chunk = []
    except (OSError, EOFError) as e:  # a damaged .gz shows up mid-way
        raise ConfigError(f"{path}: not a valid gzip file, or damaged after line {first + len(chunk) - 1} "
                          f"({e})") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if chunk:
        yield first, list(decode_lines(chunk, name, first))


def read_lines(path: str) -> list[str]:
    """All lines of a file (.gz too; '-' for stdin), split on '\\n' only, so counts match `wc -l`."""
    return [line for _, chunk in iter_line_chunks(path, 1 << 16) for line in chunk]



# ----------------------------------------------------------------------------- hostile text

_LINE_BREAKS = {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def clean_line(text: str) -> str:
    """Control characters, tabs and in-line breaks become spaces; whitespace is trimmed."""
    if text.isprintable():
        return text.strip()
    return "".join(" " if (c in _LINE_BREAKS or unicodedata.category(c) == "Cc") else c for c in text).strip()


def one_line(text: str) -> str:
    """Output text that can never add a line: every line-break character becomes a space."""
    if any(c in _LINE_BREAKS for c in text):
        text = "".join(" " if c in _LINE_BREAKS else c for c in text)
    return text


# ----------------------------------------------------------------------------- output


@contextlib.contextmanager
def open_output(path: str):
    """stdout, or a temporary file beside `path` renamed onto it when the block ends without error."""
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        f = open(tmp, "w", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write output {path}: {e.strerror or e}") from None
    try:
        with f:
            yield f
        tmp.replace(target)
    except OSError as e:
        raise ConfigError(f"cannot write output {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str, text: str) -> None:
    """Writes to stdout, or atomically to a file (see open_output)."""
    with open_output(path) as out:
        out.write(text)
        out.flush()
