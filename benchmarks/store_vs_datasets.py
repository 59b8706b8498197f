"""Token store vs Hugging Face `datasets` for tokenizing a corpus once and reading it back.

    python benchmarks/store_vs_datasets.py --corpus /work/big/synth450000 --spm /work/big/spm.model

The `datasets` way: two `text` datasets, zipped, `map(tokenize, batched=True, num_proc=2)` into
its Arrow cache (memory-mapped), then the same random reads a training epoch makes. Ours:
store.build with two workers, then data.Examples.gather. Each side runs in its own process
(build time, peak RSS, disk, random-batch read time); the order alternates over --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
args = json.loads(sys.argv[1])
out = {}
t = time.perf_counter()
if args["way"] == "datasets":
    import datasets, sentencepiece as spm
    datasets.disable_progress_bars()
    os.environ["HF_DATASETS_CACHE"] = args["cache"]
    sp = spm.SentencePieceProcessor(model_file=args["spm"])
    src = datasets.load_dataset("text", data_files=args["src"], split="train", cache_dir=args["cache"])
    tgt = datasets.load_dataset("text", data_files=args["tgt"], split="train", cache_dir=args["cache"])
    pairs = src.rename_column("text", "src").add_column("tgt", tgt["text"])
    def tok(batch):
        return {"src_ids": [x + [3] for x in sp.encode(batch["src"])], "tgt_ids": sp.encode(batch["tgt"])}
    ids = pairs.map(tok, batched=True, batch_size=4096, num_proc=2, remove_columns=["src", "tgt"])
    out["build_s"] = time.perf_counter() - t
    idx = np.random.default_rng(0).integers(0, len(ids), (200, 256))
    t = time.perf_counter()
    for b in idx:
        rows = ids[b.tolist()]
        _ = [np.asarray(x, np.int32) for x in rows["src_ids"]], [np.asarray(x, np.int32) for x in rows["tgt_ids"]]
    out["batch_ms"] = (time.perf_counter() - t) / len(idx) * 1e3
    out["disk_mb"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args["cache"]) for f in fs) / 2**20
else:
    from pathlib import Path
    from transformer_mt import store, tokenizer
    from transformer_mt.config import DataConfig
    tok = tokenizer.load_paths([args["spm"]])
    cfg = DataConfig(train_files=(args["src"], args["tgt"]), max_len=1024, store_dir=args["cache"])
    ex, d = store.open_or_build(cfg, tok, progress=False, workers=2)
    out["build_s"] = time.perf_counter() - t
    idx = np.random.default_rng(0).integers(0, len(ex), (200, 256))
    t = time.perf_counter()
    for b in idx:
        ex.gather("src", b); ex.gather("tgt", b)
    out["batch_ms"] = (time.perf_counter() - t) / len(idx) * 1e3
    out["disk_mb"] = sum(f.stat().st_size for f in d.iterdir()) / 2**20
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="prefix of CORPUS.en / CORPUS.de")
    p.add_argument("--spm", required=True)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    for r in range(args.rounds):
        for way in (("ours", "datasets") if r % 2 == 0 else ("datasets", "ours")):
            cache = tempfile.mkdtemp(prefix=f"bench-{way}-")
            spec = {"way": way, "cache": cache, "spm": args.spm, "src": args.corpus + ".en", "tgt": args.corpus + ".de"}
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                                 env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
            shutil.rmtree(cache, ignore_errors=True)
            if res.returncode:
                sys.exit(res.stderr[-2000:])
            m = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{way:9s} build {m['build_s']:6.1f} s  peak RSS {m['peak_rss_mb']:6.0f} MiB  disk {m['disk_mb']:5.0f} MiB  "
                  f"random batch of 256 pairs {m['batch_ms']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
