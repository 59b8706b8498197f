"""Continuous batching for greedy search: a pool of rows that sentences join and leave between
chunks of steps.

A batch decoded whole runs until its longest sentence ends. In a server's batch of 16-32 random
test_2016 sentences that is 1.8-2.0x the steps its sentences need (a file's length-sorted
batches waste 2-7%; benchmarks/RESULTS.md). Here a fixed pool of rows, sources padded to one
length, steps `chunk` tokens at a time (`decode.greedy_rows`); between chunks the finished rows
hand back their translations and waiting sentences take their slots (`admit`: encoded, their
cross-attention keys and values written into the pool). Each row moves at its own position
(`Transformer.decode_rows`), so a sentence gets the tokens it gets from `translate`.

The pool's arrays stay on the devices, rows split over the mesh's data axis, each device stepping
its own rows in its own loop (as `search.compiled_search` does). New sentences take the lowest
free rows, and a call steps only each device's first rows up to its highest busy one (rounded up
to a power of two), so under light load a step costs what a small batch costs. Programs: one
`advance` per such width and one `admit` per power of two of new rows a device, kept in the
program store like the search programs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from transformer_mt import decode as decode_lib
from transformer_mt import int8_kernel, matmul, program_store, sharding
from transformer_mt.decode_batches import next_power_of_two
from transformer_mt.search import SearchProgram, SearchSettings
from transformer_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, cut_at_eos


class RowPool:
    """`rows` rows (a multiple of the mesh's data size) of sources padded to `length` tokens,
    decoded greedily with `settings` (beam 1, no sampling, no prefixes) `chunk` steps a call."""

    def __init__(self, graphdef, params, mesh, settings: SearchSettings, rows: int, length: int, chunk: int = 8):
        if settings.beam_size != 1 or settings.sampling:
            raise ValueError("a row pool decodes greedily")
        self.graphdef, self.params, self.mesh, self.settings = graphdef, params, mesh, settings
        self.devices = sharding.data_size(mesh)
        if rows % self.devices:
            raise ValueError(f"rows ({rows}) must be a multiple of the data-parallel size ({self.devices})")
        self.rows, self.length, self.chunk = rows, length, chunk
        self.per_device = rows // self.devices
        self.max_steps = settings.max_steps(length)
        self.owner: list = [None] * rows  # what each slot decodes (the caller's key), None when free
        self._state = None  # leaves of the pool's arrays, created by reset()
        self._treedef = None
        kernel, prepare = int8_kernel.preparer_for(graphdef, settings.precision, mesh)
        key = (program_store.structure(graphdef), settings.precision, kernel, settings.max_len_a, settings.max_len_b,
               settings.max_len_cap, rows, length, chunk,
               (mesh.devices.tolist(), mesh.axis_names))
        # the rows a device steps: the smallest of these that holds its highest busy row (new
        # sentences take the lowest free rows, so under light load a step costs what a small batch does)
        self.widths = sorted({min(self.per_device, 1 << k) for k in range(1, self.per_device.bit_length() + 1)})
        self._advance = {w: SearchProgram(_advance_program(graphdef, mesh, settings.precision, chunk, w, kernel),
                                          ("rowpool-advance", w) + key, list(mesh.devices.flat), prepare)
                         for w in self.widths}
        self._admit = SearchProgram(_admit_program(graphdef, mesh, settings.precision, kernel),
                                    ("rowpool-admit",) + key, list(mesh.devices.flat), prepare)
        self.reset()

    # ------------------------------------------------------------------ host side

    def reset(self) -> None:
        """Every slot free (after an error, whatever was decoding is dropped)."""
        model = nnx.merge(self.graphdef, self.params)
        state = _empty_state(model, self.rows, self.length, self.max_steps)
        leaves, self._treedef = jax.tree.flatten(state)
        self._state = list(sharding.put_batch(self.mesh, {str(i): np.asarray(x) for i, x in enumerate(leaves)})
                           [str(i)] for i in range(len(leaves)))
        self.owner = [None] * self.rows

    @property
    def active(self) -> int:
        return sum(o is not None for o in self.owner)

    def free(self) -> int:
        return self.rows - self.active

    def admit(self, sources: Sequence[tuple[object, Sequence[int]]]) -> None:
        """Starts decoding each (key, source ids) in a free slot; at most free() of them, each
        with at least one token besides its EOS and within `length`."""
        if len(sources) > self.free():
            raise ValueError(f"{len(sources)} sources for {self.free()} free rows")
        free_by_device = [[s for s in range(d * self.per_device, (d + 1) * self.per_device) if self.owner[s] is None]
                          for d in range(self.devices)]
        placed: list[list[tuple[int, Sequence[int]]]] = [[] for _ in range(self.devices)]
        for key, ids in sources:  # the lowest free row of any device: the busy rows stay low and even
            d = min((d for d in range(self.devices) if len(free_by_device[d]) > len(placed[d])),
                    key=lambda d: free_by_device[d][len(placed[d])] - d * self.per_device)
            slot = free_by_device[d][len(placed[d])]
            placed[d].append((slot, ids))
            self.owner[slot] = key
        n = next_power_of_two(max(len(p) for p in placed))
        src = np.full((self.devices * n, self.length), PAD_ID, np.int32)
        max_lens = np.ones((self.devices * n,), np.int32)
        slots = np.full((self.devices * n,), self.per_device, np.int32)  # past the device's rows: dropped
        for d, rows in enumerate(placed):
            for j, (slot, ids) in enumerate(rows):
                src[d * n + j, : len(ids)] = ids
                max_lens[d * n + j] = self.settings.max_steps(len(ids))
                slots[d * n + j] = slot - d * self.per_device
        self._run_admit(src, max_lens, slots)

    def _filler(self, n: int, busy: int) -> tuple:
        """Admit arguments of n all-padding sources a device, the first `busy` of them into row 0
        with a length limit of 1 (one step), the rest dropped."""
        slots = np.tile(np.where(np.arange(n) < busy, 0, self.per_device), self.devices).astype(np.int32)
        return (np.full((self.devices * n, self.length), PAD_ID, np.int32), np.ones((self.devices * n,), np.int32),
                slots)

    def _run_admit(self, src, max_lens, slots) -> None:
        """The admit program on [devices * n] rows: device d's sources are rows d * n ..."""
        batch = sharding.put_batch(self.mesh, {"src": src, "max_lens": max_lens, "slots": slots})
        self._state = list(self._admit(self.params, batch["src"], batch["max_lens"], batch["slots"], *self._state))

    def advance(self) -> list[tuple[object, list[int], float]]:
        """Up to `chunk` steps of every busy row; (key, output ids, score) of each row that
        finished, whose slot is free again."""
        busy = max((slot % self.per_device + 1 for slot, key in enumerate(self.owner) if key is not None), default=1)
        width = next(w for w in self.widths if w >= busy)
        self._state = list(self._advance[width](self.params, *self._state))
        state = jax.tree.unflatten(self._treedef, self._state)
        done, tokens, scores = jax.device_get((state["done"], state["tokens"], state["scores"]))
        out = []
        for slot, key in enumerate(self.owner):
            if key is not None and done[slot]:
                out.append((key, cut_at_eos(tokens[slot]), float(scores[slot])))
                self.owner[slot] = None
        return out

    def warm_up(self) -> None:
        """Compiles (or loads) every admit and advance program and runs each advance once on a
        busy filler row (XLA:CPU sets up the kernels of a loop's body on their first run, ~30 ms
        a program here, which no request should pay)."""
        self.reset()
        for n in sorted({next_power_of_two(m) for m in range(1, self.per_device + 1)}):
            self._run_admit(*self._filler(n, busy=0))
        for width in self.widths:
            self._run_admit(*self._filler(1, busy=1))  # row 0 of each device busy for one step
            self._state = list(self._advance[width](self.params, *self._state))
        jax.block_until_ready(self._state)
        self.reset()


def _empty_state(model, rows: int, length: int, max_steps: int) -> dict:
    """Every row free: done, nothing to decode. Cross-attention keys/values of `length` positions."""
    heads, head_dim = model.cfg.num_heads, model.cfg.d_model // model.cfg.num_heads
    cross_shape = (rows, heads, length, head_dim)
    cross = {"layers": tuple((jnp.zeros(cross_shape, model.dtype), jnp.zeros(cross_shape, model.dtype))
                             for _ in model.decoder_layers),
             "mask": jnp.zeros((rows, 1, length, 1), bool)}
    return {"last": jnp.full((rows,), PAD_ID, jnp.int32), "tokens": jnp.full((rows, max_steps), PAD_ID, jnp.int32),
            "done": jnp.ones((rows,), bool), "scores": jnp.zeros((rows,), jnp.float32),
            "max_lens": jnp.ones((rows,), jnp.int32), "cache": model.init_row_cache(rows, max_steps),
            "cross": cross}


@functools.lru_cache(maxsize=64)
def _advance_program(graphdef, mesh, precision: str, chunk: int, width: int, kernel: bool = False):
    """Jitted advance(params, prepared, *state leaves) -> state leaves: `chunk` steps of each
    device's first `width` rows (the others, free, are left as they are); prepared: the int8
    kernel's packed weights (kernel) or nothing."""

    def advance(params, prepared, *leaves):
        with matmul.decoding_inputs(precision), int8_kernel.decoding_model(graphdef, params, prepared, kernel) as model:
            state = jax.tree.unflatten(_treedef_of(model, leaves), leaves)
            rows = state["done"].shape[0]
            head = state if width >= rows else jax.tree.map(lambda x: x[:width], state)
            step = functools.partial(model.decode_rows, cross=head["cross"])
            moving = {k: v for k, v in head.items() if k != "cross"}
            moved = decode_lib.greedy_rows(step, moving, steps=chunk, eos_id=EOS_ID, pad_id=PAD_ID,
                                           banned_ids=(PAD_ID, BOS_ID))
            if width < rows:
                moved = jax.tree.map(lambda full, part: full.at[:width].set(part),
                                     {k: state[k] for k in moved}, moved)
            return tuple(jax.tree.leaves({**moved, "cross": state["cross"]}))

    return _jit_rows(advance, mesh, whole=2)


@functools.lru_cache(maxsize=16)
def _admit_program(graphdef, mesh, precision: str, kernel: bool = False):
    """Jitted admit(params, prepared, src, max_lens, slots, *state leaves) -> state leaves: each
    device's new sources encoded and written into its rows `slots` (a slot past its rows: dropped)."""

    def admit(params, prepared, src, max_lens, slots, *leaves):
        with matmul.decoding_inputs(precision), int8_kernel.decoding_model(graphdef, params, prepared, kernel) as model:
            state = jax.tree.unflatten(_treedef_of(model, leaves), leaves)
            encoded, src_mask = model.encode(src)
            fresh = model.cross_state(encoded, src_mask)

            def put(array, values):
                return array.at[slots].set(values.astype(array.dtype), mode="drop")

            cross = {"layers": tuple((put(k, nk), put(v, nv)) for (k, v), (nk, nv)
                                     in zip(state["cross"]["layers"], fresh["layers"])),
                     "mask": put(state["cross"]["mask"], fresh["mask"])}
            n = src.shape[0]
            cache = {**state["cache"], "positions": put(state["cache"]["positions"], jnp.zeros((n,), jnp.int32))}
            new = {"last": put(state["last"], jnp.full((n,), BOS_ID, jnp.int32)),
                   "tokens": put(state["tokens"], jnp.full((n, state["tokens"].shape[1]), PAD_ID, jnp.int32)),
                   "done": put(state["done"], jnp.zeros((n,), bool)),
                   "scores": put(state["scores"], jnp.zeros((n,), jnp.float32)),
                   "max_lens": put(state["max_lens"], max_lens), "cache": cache, "cross": cross}
            return tuple(jax.tree.leaves(new))

    return _jit_rows(admit, mesh, whole=2, leading_rows=3)


def _treedef_of(model, leaves) -> object:
    """The pool state's tree structure (the same for any sizes), from a tiny empty state."""
    return jax.tree.structure(jax.eval_shape(lambda: _empty_state(model, 1, 1, 1)))


def _jit_rows(fn, mesh, whole: int, leading_rows: int = 0):
    """jit(fn) whose first `whole` arguments are replicated and every other one split by rows
    over the mesh's data axis (each device runs fn on its own rows); the pool's state (the
    arguments after `whole + leading_rows`) is donated: updated in place, not copied."""
    if sharding.data_size(mesh) > 1:
        rows, rep = P(sharding.DATA), P()

        def specs(n_args):
            return (rep,) * whole + (rows,) * (n_args - whole)

        inner = fn

        def fn(*args):  # noqa: F811 (the shard_map needs the argument count)
            return jax.shard_map(inner, mesh=mesh, in_specs=specs(len(args)), out_specs=rows, check_vma=False)(*args)

    return _DonatingJit(fn, whole + leading_rows)


class _DonatingJit:
    """jax.jit(fn) donating every argument from index `first` on (any count of them)."""

    def __init__(self, fn, first: int):
        self.fn, self.first = fn, first
        self._by_count: dict[int, object] = {}

    def _jitted(self, n_args: int):
        jitted = self._by_count.get(n_args)
        if jitted is None:
            jitted = self._by_count[n_args] = jax.jit(self.fn, donate_argnums=tuple(range(self.first, n_args)))
        return jitted

    def __call__(self, *args):
        return self._jitted(len(args))(*args)

    def lower(self, *args):
        return self._jitted(len(args)).lower(*args)
