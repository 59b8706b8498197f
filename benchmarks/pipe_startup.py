"""Time from launching `transformer-mt translate` to its first output line, for a one-line pipe:
first run (empty compilation cache) and second run (cache filled by the first).

    python benchmarks/pipe_startup.py --checkpoint runs/multi30k [--beam 4] [--runs 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def time_to_first_line(cmd: list[str], text: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    proc.stdin.write(text + "\n")
    proc.stdin.flush()  # the pipe stays open: the answer must come before end of input
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.stdin.close()
    proc.wait()
    return elapsed, line.rstrip("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--beam", type=int, help="beam size (default: the run's config)")
    p.add_argument("--runs", type=int, default=2, help="runs sharing one fresh compilation cache")
    p.add_argument("--text", default="A dog runs in the park .")
    p.add_argument("--cpu-devices", type=int, help="translate's --cpu-devices (default: translate's default)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "transformer_mt.cli", "translate", "--checkpoint", args.checkpoint,
               "--buffer-lines", "1", "--compile-cache", cache]
        if args.beam:
            cmd += ["--beam", str(args.beam)]
        if args.cpu_devices:
            cmd += ["--cpu-devices", str(args.cpu_devices)]
        for run in range(1, args.runs + 1):
            seconds, line = time_to_first_line(cmd, args.text)
            print(f"run {run}: first line after {seconds:.2f} s ({'empty' if run == 1 else 'filled'} cache): {line!r}")


if __name__ == "__main__":
    main()
