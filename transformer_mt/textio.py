"""Reading text the way `wc -l` counts it: lines end at '\n' only, never at '\r', U+2028 or
form feeds, so parallel files stay aligned and every input line gets one output line.
Invalid UTF-8 is replaced (U+FFFD) with a warning naming the file and line.
"""

from __future__ import annotations

import gzip
import sys
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


def read_lines(path: str) -> list[str]:
    """All lines of a file (.gz too; '-' for stdin), split on '\\n' only, so counts match `wc -l`."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"input file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"input is a directory, not a file: {path}") from None
        except PermissionError:
            raise ConfigError(f"input file is not readable: {path}") from None
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ConfigError(f"{path}: not a valid gzip file ({e})") from None
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return list(decode_lines(lines, "stdin" if path == "-" else path))
