"""The data pipeline at WMT scale: store build, second launch, epoch plan, batches/s, memory a pair.

    python benchmarks/data_scale.py --sizes 4500000 40000000 --dir /work/big

Writes a synthetic corpus of each size from Multi30k sentences (each line two random training
pairs joined, ~26 words a side, like WMT14's average; never committed), then for each size prints:
  - store build: seconds and peak RSS of a fresh process building it (tokenizer given)
  - store size on disk, and bytes a pair
  - second launch: seconds from a new process's start to its first batch (store found in the cache)
  - epoch plan seconds (packed rows and buckets)
  - pipeline alone: batches/s and real target tokens/s of TrainStream (one thread, no model)
  - RSS of the process holding the store and a plan, above its baseline, per pair
Each measurement runs in its own child process, so peak RSS figures are that phase's alone.

With --cli, also runs `transformer-mt train` itself as a user would (Transformer-base sizes, 3
steps) on each corpus and on Multi30k: a first launch (tokenizer training, store build) and a
second one in a new run directory (tokenizer and store from the caches, compile cache filled),
printing seconds from launch to the first step and the peak RSS of each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MULTI30K = ROOT / "data" / "multi30k"


def write_corpus(out: Path, n: int, seed: int = 0) -> list[str]:
    """Two files of n lines, each line two random Multi30k training pairs joined (same pairs both sides)."""
    files = [out / f"synth{n}.en", out / f"synth{n}.de"]
    if all(f.is_file() for f in files):
        return [str(f) for f in files]
    sides = [gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8").read().split("\n")[:-1]
             for lang in ("en", "de")]
    rng = np.random.default_rng(seed)
    tmp = [f.with_name(f.name + ".tmp") for f in files]
    handles = [open(t, "w", encoding="utf-8") for t in tmp]
    for start in range(0, n, 500_000):
        m = min(500_000, n - start)
        a, b = rng.integers(0, len(sides[0]), m), rng.integers(0, len(sides[0]), m)
        for side, h in zip(sides, handles):
            h.write("".join(f"{side[i]} {side[j]}\n" for i, j in zip(a, b)))
    for h, t, f in zip(handles, tmp, files):
        h.close()
        t.replace(f)
    return [str(f) for f in files]


CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
from dataclasses import replace
import numpy as np
from transformer_mt import config as config_lib, data as data_lib, store as store_lib, tokenizer as tok_lib
args = json.loads(sys.argv[1])
cfg = config_lib.load(args["config"], args["overrides"])
tok = tok_lib.load_paths([args["spm"]])
out = {}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if args["phase"] == "build":
    t = time.perf_counter()
    store_lib.open_or_build(cfg.data, tok, progress=False)
    out["build_s"] = time.perf_counter() - t
else:
    base = rss()
    pairs, directory = store_lib.open_or_build(cfg.data, tok, progress=False)
    out["open_s"] = time.perf_counter() - t0
    stream = data_lib.TrainStream(pairs, cfg.data, 0, 1)
    t = time.perf_counter(); plan = stream.plan(0); out["plan_s"] = time.perf_counter() - t
    batch = next(stream)
    out["first_batch_s"] = time.perf_counter() - t0
    out["pairs"] = len(pairs); out["batches"] = len(plan)
    out["disk_mb"] = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
    t = time.perf_counter(); tokens = 0; n = 0
    while time.perf_counter() - t < args["seconds"]:
        b = next(stream); tokens += int((b["tgt_out"] != 0).sum()); n += 1
    dt = time.perf_counter() - t
    out["batches_per_s"] = n / dt; out["tokens_per_s"] = tokens / dt
    out["rss_above_base_mb"] = rss() - base
    other = replace(cfg.data, pack_lengths=())
    t = time.perf_counter(); data_lib.plan_epoch(pairs, other, 1, 0, 1); out["bucketed_plan_s"] = time.perf_counter() - t
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(phase: str, spec: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**spec, "phase": phase})], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


BASE = ["model.d_model=512", "model.num_heads=8", "model.num_encoder_layers=6", "model.num_decoder_layers=6",
        "model.ffn_dim=2048", "model.dropout=0.1", "data.batch_tokens=4096", "train.grad_accum=1",
        "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "train.bleu_every=0",
        "train.checkpoint_every=0", "train.warmup_steps=100", "train.learning_rate=7e-4"]


def cli_launch(workdir: Path, overrides: list[str], config: str) -> tuple[float, float]:
    """(seconds from launch to the end of step 1, peak RSS MiB) of one `transformer-mt train`."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    sets = [a for o in BASE + overrides for a in ("--set", o)]
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "transformer_mt.cli", "train", "--config", config, *sets,
                             "--workdir", str(workdir), "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(workdir.with_suffix(".log"), "w"))
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    if status:
        sys.exit(f"train failed: see {workdir.with_suffix('.log')}")
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - start, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[450_000, 4_500_000])
    p.add_argument("--dir", default="/tmp/transformer_mt_scale", help="where corpora and stores go")
    p.add_argument("--config", default=str(ROOT / "configs" / "multi30k_en_de.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides (key=value)")
    p.add_argument("--seconds", type=float, default=10.0, help="pipeline timing per size")
    p.add_argument("--cli", action="store_true", help="also time `transformer-mt train` launches (base sizes)")
    args = p.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    spm = out / "spm.model"
    if not spm.is_file():
        from transformer_mt import tokenizer as tok_lib
        from transformer_mt.config import TokenizerConfig

        sides = [gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8").read().split("\n")[:-1]
                 for lang in ("en", "de")]
        tok_lib.train(TokenizerConfig(vocab_size=8000), *sides, out)
    for n in args.sizes:
        t = time.perf_counter()
        files = write_corpus(out, n)
        written = time.perf_counter() - t
        spec = {"config": args.config, "spm": str(spm), "seconds": args.seconds,
                "overrides": args.overrides + [f"data.train_files=[{files[0]}, {files[1]}]", "data.max_train_examples=0",
                                               f"data.store_dir={out / 'stores'}"]}
        built = child("build", spec)
        used = child("use", spec)
        mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"{n:,} pairs ({mb:,.0f} MB of text; corpus written in {written:.0f} s): "
              f"store built in {built['build_s']:.1f} s at peak RSS {built['peak_rss_mb']:,.0f} MiB; "
              f"{used['pairs']:,} pairs kept, store {used['disk_mb']:,.0f} MiB ({used['disk_mb'] * 2**20 / used['pairs']:.1f} B/pair)")
        print(f"  second launch: store open {used['open_s']:.2f} s, first batch {used['first_batch_s']:.2f} s after start; "
              f"epoch plan {used['plan_s']:.2f} s packed ({used['batches']:,} batches), {used['bucketed_plan_s']:.2f} s bucketed")
        print(f"  pipeline alone: {used['batches_per_s']:,.0f} batches/s, {used['tokens_per_s']:,.0f} real target tokens/s; "
              f"RSS {used['rss_above_base_mb']:,.0f} MiB above start ({used['rss_above_base_mb'] * 2**20 / used['pairs']:.1f} B/pair), "
              f"peak {used['peak_rss_mb']:,.0f} MiB", flush=True)
        if args.cli:
            sets = args.overrides + [f"data.train_files=[{files[0]}, {files[1]}]", "data.max_train_examples=0"]
            first = cli_launch(out / "run1", sets, args.config)
            second = cli_launch(out / "run2", sets, args.config)
            print(f"  transformer-mt train (base sizes): first launch {first[0]:.0f} s to step 1 (peak RSS "
                  f"{first[1]:,.0f} MiB), second launch {second[0]:.1f} s (peak RSS {second[1]:,.0f} MiB)", flush=True)
    if args.cli:
        m30k = cli_launch(out / "run_m30k", [o for o in args.overrides if not o.startswith("data.store_dir")], args.config)
        print(f"Multi30k, same model: {m30k[0]:.1f} s to step 1, peak RSS {m30k[1]:,.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
