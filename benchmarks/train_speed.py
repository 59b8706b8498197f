"""Training throughput of a config on this machine: target tokens/s, padded tokens/s, peak memory.

    python benchmarks/train_speed.py --config configs/multi30k_en_de.yaml --steps 20

Uses real batches from the config's training data (all of it, or the first --pairs N), after one
warm-up step per batch shape so compile time is excluded. For a like-for-like ratio with the
PyTorch peer, train on exactly its batches (one optimizer step per peer batch, at its shapes):

    ~/.cache/peers-venv/bin/python ../shared/peers/hf_bench.py --skip-decode --dump-batches /tmp/peer.json
    python benchmarks/train_speed.py --config configs/multi30k_en_de_d256.yaml --peer-batches /tmp/peer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import CompileCounter, matmul_gflops, peak_rss_mib

from transformer_mt import corpus
from transformer_mt import compile_cache
from transformer_mt import config as config_lib
from transformer_mt import data as data_lib
from transformer_mt import sharding
from transformer_mt import tokenizer as tok_lib
from transformer_mt import train_step as ts
from transformer_mt.rundir import build_model
from transformer_mt.trainer import compiled_steps


def peer_batches(path: str, cfg: config_lib.Config, tok, row_multiple: int) -> list[dict]:
    """The peer's batches (`hf_bench.py --dump-batches`: train line indices per step) in our
    format, tokenized by our tokenizer, at the peer's own shapes (rows = its pairs, length = its
    longest pair): the same work, one compile per batch (excluded from the timing)."""
    try:
        spec = json.loads(open(path, encoding="utf-8").read())["batches"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path}: not a hf_bench.py --dump-batches file ({e})")
    src, tgt = corpus.load_split(dataclasses.replace(cfg.data, max_train_examples=0), "train")
    out = []
    for indices in spec:
        ex = data_lib.tokenize_pairs(tok, [src[i] for i in indices], [tgt[i] for i in indices], None)
        if len(ex) != len(indices):
            raise SystemExit(f"error: {path}: a batch holds an empty training pair")
        rows = -(-len(ex) // row_multiple) * row_multiple
        order = np.concatenate([np.arange(len(ex)), np.full(rows - len(ex), -1)])
        out.append(data_lib.pad_batch(ex, order, rows, int(ex.lengths().max())))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/multi30k_en_de.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--pairs", type=int, default=0, help="training pairs to draw batches from (0: all)")
    p.add_argument("--workdir", default="/tmp/transformer_mt_bench", help="where the tokenizer is trained/cached")
    p.add_argument("--peer-batches", help="train on these batches (hf_bench.py --dump-batches), all timed, "
                                          "one optimizer step each (grad_accum 1)")
    args = p.parse_args()

    compile_cache.enable()  # a repeated run (A/B/A/B comparisons) skips most of the warm-up
    pairs = [f"data.max_train_examples={args.pairs}"] if args.pairs else []
    cfg = config_lib.load(args.config, args.overrides + pairs)
    src, tgt = corpus.load_split(cfg.data, "train")
    tok = tok_lib.load_or_train(cfg.tokenizer, args.workdir, lambda: (src, tgt))
    mesh = sharding.make_mesh()
    examples = data_lib.tokenize_pairs(tok, src, tgt, cfg.data.max_len)
    stream = data_lib.TrainStream(examples, cfg.data, 0, sharding.data_size(mesh))
    accum = cfg.train.grad_accum  # micro-batches per optimizer step, run as the trainer runs them
    if args.peer_batches:
        batches, accum = peer_batches(args.peer_batches, cfg, tok, sharding.data_size(mesh)), 1
        args.steps = len(batches)
    else:
        batches = [next(stream) for _ in range(args.steps * accum)]

    model = build_model(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    tx = ts.make_optimizer(cfg.train)
    graphdef, state = ts.init_state(model, tx, 0)
    state = sharding.put_state(mesh, state)
    state_leaves, state_treedef = jax.tree.flatten(sharding.state_sharding(mesh, state))
    steps = compiled_steps(graphdef, ts.OptimizerSettings.of(cfg.train), cfg.train.label_smoothing, mesh,
                           state_treedef, tuple(state_leaves))

    def step(state, group):  # the trainer's one_step: fused, or micro + add + apply
        if len(group) == 1:
            return steps.fused(state, sharding.put_batch(mesh, group[0]))
        acc = None
        for i, b in enumerate(group):
            out = steps.micro(state, sharding.put_batch(mesh, b), jnp.int32(i))
            acc = out if acc is None else steps.add(acc, *out)
        return steps.apply(state, *acc)

    rss_setup = peak_rss_mib()  # imports, data, tokenizer, model and optimizer state
    probe_start = matmul_gflops()
    counter = CompileCounter()
    t0 = time.time()
    shapes = sorted({b["src"].shape for b in batches})
    for shape in shapes:  # compile every shape first
        b = next(x for x in batches if x["src"].shape == shape)
        state, m = step(state, [b] * accum)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    rss_compiled = peak_rss_mib()
    compiles, compile_seconds = counter.count, counter.seconds

    t0, c0 = time.time(), time.process_time()
    for k in range(args.steps):
        state, m = step(state, batches[k * accum : (k + 1) * accum])
    jax.block_until_ready(m)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    target = sum(int((b["tgt_out"] != 0).sum()) for b in batches)
    padded = sum(b["tgt_out"].size for b in batches)
    peak = peak_rss_mib()
    stats = jax.devices()[0].memory_stats() or {}
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"config {args.config} {args.overrides}: {n_params / 1e6:.2f}M params, {len(jax.devices())} "
          f"{jax.default_backend()} device(s)")
    probe_end = matmul_gflops()
    print(f"warm-up/compile {compile_s:.1f}s for {len(shapes)} shapes: {compiles} XLA compiles "
          f"({compile_seconds:.1f} s; the rest loaded from the persistent cache)"
          + (f"; the peer's {len(batches)} batches from {args.peer_batches}" if args.peer_batches else ""))
    print(f"{args.steps} steps in {seconds:.2f}s: {target / seconds:,.0f} target tokens/s, "
          f"{padded / seconds:,.0f} padded target tokens/s, {seconds / args.steps * 1000:.0f} ms/step, "
          f"padding {1 - target / padded:.1%} of target positions")
    print(f"grad_accum {accum} x batch_tokens {cfg.data.batch_tokens}; process CPU {cpu_seconds:.2f}s "
          f"({cpu_seconds / seconds:.2f} cores busy): {target / cpu_seconds:,.0f} target tokens per CPU-second")
    print(f"peak host RSS {peak:,.0f} MiB (after setup {rss_setup:,.0f}, after the compiling steps "
          f"{rss_compiled:,.0f})" + (f", peak device memory {stats['peak_bytes_in_use'] / 2**20:,.0f} MiB"
                                               if "peak_bytes_in_use" in stats else ""))
    flops = 6 * n_params * target  # rough model FLOPs
    print(f"~{flops / seconds / 1e9:,.0f} GFLOP/s model FLOPs (6 * params * target tokens): "
          f"{flops / seconds / 1e9 / max(probe_start, probe_end):.0%} of this machine's f32 matmul rate "
          f"(1024^3 probe {probe_start:,.0f} / {probe_end:,.0f} GFLOP/s before / after)")
    np.asarray(m["loss"])


if __name__ == "__main__":
    main()
