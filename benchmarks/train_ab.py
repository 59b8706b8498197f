"""In-process A/B of training configs: real target tokens/s of each variant, rounds alternated.

    python benchmarks/train_ab.py --variant model.matmul_dtype=float32 --variant model.matmul_dtype=bfloat16
    python benchmarks/train_ab.py --variant data.pack_lengths=[64] --variant "data.pack_lengths=[32,64]"

Absolute speed on a small shared CPU moves ~20% from one process to the next, which hides 5-10%
changes between separate runs. Here every variant is compiled in one process and timed in
alternating rounds (A B, B A, ...) on the first --batches micro-batches of its own training
stream (the whole training set), so the ratio of the medians is what a change gives. Each
--variant is a comma-separated list of --set overrides of --config ("" = the config as is;
commas inside [...] belong to a list value).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp

from transformer_mt import corpus
from transformer_mt import compile_cache, sharding
from transformer_mt import config as config_lib
from transformer_mt import data as data_lib
from transformer_mt import tokenizer as tok_lib
from transformer_mt import train_step as ts
from transformer_mt.rundir import build_model
from transformer_mt.trainer import compiled_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/multi30k_en_de.yaml")
    p.add_argument("--variant", action="append", required=True, help="comma-separated overrides; give 2 or more")
    p.add_argument("--batches", type=int, default=40, help="micro-batches per timed round (even)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cache-dir", default="/tmp/transformer_mt_bench", help="tokenizer cache")
    args = p.parse_args()
    compile_cache.enable()
    base = config_lib.load(args.config, [])
    src, tgt = corpus.load_split(base.data, "train")
    tok = tok_lib.load_or_train(base.tokenizer, args.cache_dir, lambda: (src, tgt))
    mesh = sharding.make_mesh()
    runs = {}
    for variant in args.variant:
        overrides = [o for o in re.split(r",(?![^\[]*\])", variant) if o]  # commas outside [...]
        cfg = config_lib.load(args.config, overrides)
        examples = data_lib.tokenize_pairs(tok, src, tgt, cfg.data.max_len)
        stream = data_lib.TrainStream(examples, cfg.data, cfg.train.seed, sharding.data_size(mesh))
        batches = [next(stream) for _ in range(args.batches)]
        model = build_model(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
        tx = ts.make_optimizer(cfg.train)
        graphdef, state = ts.init_state(model, tx, cfg.train.seed)
        state = sharding.put_state(mesh, state)
        leaves, treedef = jax.tree.flatten(sharding.state_sharding(mesh, state))
        steps = compiled_steps(graphdef, ts.OptimizerSettings.of(cfg.train), cfg.train.label_smoothing, mesh,
                               treedef, tuple(leaves))
        real = sum(int((b["tgt_out"] != data_lib.PAD_ID).sum()) for b in batches)
        runs[variant] = {"steps": steps, "state": state, "batches": batches, "real": real, "times": []}

    def run(variant: str, batches) -> None:
        r = runs[variant]
        state, steps = r["state"], r["steps"]
        for k in range(0, len(batches) - 1, 2):  # two micro-batches per optimizer step
            a = steps.micro(state, sharding.put_batch(mesh, batches[k]), jnp.int32(0))
            b = steps.micro(state, sharding.put_batch(mesh, batches[k + 1]), jnp.int32(1))
            state, metrics = steps.apply(state, *steps.add(a, *b))
        jax.block_until_ready(metrics)
        r["state"] = state

    for variant, r in runs.items():  # compile every shape of the variant
        shapes = {}
        for b in r["batches"]:
            shapes.setdefault(b["src"].shape, b)
        for b in shapes.values():
            run(variant, [b, b])
        print(f"{variant or '(config)'}: shapes {sorted(shapes)}, {r['real']:,} real target tokens", flush=True)
    for i in range(args.rounds):
        for variant in (args.variant if i % 2 == 0 else args.variant[::-1]):
            start = time.perf_counter()
            run(variant, runs[variant]["batches"])
            runs[variant]["times"].append(time.perf_counter() - start)
    first = None
    for variant, r in runs.items():
        speeds = [r["real"] / t for t in r["times"]]
        median = statistics.median(speeds)
        first = first or median
        print(f"{variant or '(config)'}: median {median:,.0f} real target tok/s ({median / first:.3f}x the first); "
              f"rounds {', '.join(f'{s:,.0f}' for s in speeds)}")


if __name__ == "__main__":
    main()
