"""Feeds `transformer-mt translate` a file of hostile lines and counts what comes out.

    python benchmarks/hostile_translate.py --checkpoint runs/tiny --lines 5000 --seed 0

The lines mix Multi30k sentences with invalid UTF-8, NUL and other control characters, CRLF
endings, tabs, emoji, right-to-left scripts, combining marks, in-line separators (U+2028, form
feed, a bare CR), empty and whitespace-only lines, and lines far longer than the model accepts.
The file is translated twice, as a file (-i/-o) and through a pipe (stdin to stdout, in chunks);
both must give exactly one output line per input line and exit 0. Prints lines fed, lines out,
lines lost, the exit codes and the warnings by kind.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = [
    b"",
    b"   ",
    b"\t\t",
    b"\r",
    b"A man\r\n"[:-1],  # a CRLF line once split on '\n'
    b"\xff\xfe invalid \xc3\x28 utf-8 \xed\xa0\x80",
    b"\x00\x01\x02 control \x1b[31m characters \x7f",
    b"tabs\tbetween\twords",
    "emoji 🐕🚲👩‍👧 and a flag 🇩🇪".encode(),
    "right to left: כלב רץ בשלג و قطة تنام".encode(),
    "combining: e\u0301 a\u0308 Z\u0335\u0321\u0347a\u0336lgo".encode(),
    "separators\u2028inside\u2029one line\x0bvertical\x0cfeed\x85next".encode(),
    b"bare\rcarriage return",
    "zero\u200bwidth\ufeffspaces\u200d".encode(),
    "\U0010ffff private \ue000 use".encode(),
]


def multi30k_sentences() -> list[bytes]:
    return gzip.decompress((ROOT / "data" / "multi30k" / "val.en.gz").read_bytes()).split(b"\n")[:-1]


def hostile_lines(n: int, seed: int) -> list[bytes]:
    """n lines, none containing b'\\n': a third hostile samples, a third long, a third plain."""
    rng = random.Random(seed)
    plain = multi30k_sentences()
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.33:
            lines.append(rng.choice(HOSTILE))
        elif kind < 0.5:  # far longer than any bucket: several sentences and hostile bits joined
            parts = [rng.choice(plain) for _ in range(rng.randint(8, 30))] + [rng.choice(HOSTILE)]
            rng.shuffle(parts)
            lines.append(b" ".join(parts))
        elif kind < 0.6:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).replace(b"\n", b" "))
        else:
            lines.append(rng.choice(plain))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam", type=int, default=4)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hostile_"))
    src = tmp / "hostile.txt"
    lines = hostile_lines(args.lines, args.seed)
    src.write_bytes(b"".join(line + (b"\r\n" if i % 7 == 3 else b"\n") for i, line in enumerate(lines)))
    fed = src.read_bytes().count(b"\n")
    base = [sys.executable, "-m", "transformer_mt.cli", "translate", "--checkpoint", args.checkpoint,
            "--beam", str(args.beam), "--no-progress"]
    ok = True
    outputs = {}
    for mode in ("file", "pipe"):
        t0 = time.time()
        if mode == "file":
            out = tmp / "out.txt"
            r = subprocess.run(base + ["-i", str(src), "-o", str(out)], cwd=ROOT, capture_output=True)
            produced = out.read_bytes() if out.exists() else b""
        else:
            r = subprocess.run(base + ["--buffer-lines", "500"], cwd=ROOT, input=src.read_bytes(), capture_output=True)
            produced = r.stdout
        seconds = time.time() - t0
        outputs[mode] = produced
        got = produced.count(b"\n")
        warnings = collections.Counter()
        for line in r.stderr.decode(errors="replace").splitlines():
            if line.startswith("warning:"):
                warnings["invalid UTF-8" if "invalid UTF-8" in line else
                         "long line" if "tokens, longer than" in line else
                         "long-line count" if "translated from their beginning" in line else "other"] += 1
        try:
            produced.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        print(f"{mode}: lines fed {fed}, lines out {got}, lines lost {fed - got}, exit code {r.returncode}, "
              f"output valid UTF-8 {valid}, {seconds:.1f} s; warnings: {dict(warnings)}")
        for line in r.stderr.decode(errors="replace").splitlines():
            if "translated from their beginning" in line or line.startswith("translated "):
                print(f"  {line}")
        ok &= r.returncode == 0 and got == fed and valid
    same = outputs["file"] == outputs["pipe"]
    print(f"file and pipe outputs identical: {same}")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
