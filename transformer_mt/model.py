"""Encoder-decoder Transformer (Vaswani et al., 2017) in Flax NNX.

Entry points: `encode` (once per batch), `decode` (teacher forcing, training), and
`cross_state` + `init_cache` + `decode_step` (+ `reorder_cache` for beams; `decode_argmax_step`
for greedy search without scores): incremental decoding,
where the encoder's cross-attention keys/values are projected once per sentence and
self-attention keys/values are cached; `init_row_cache` + `decode_rows`: the same step for rows
at positions of their own (continuous batching, rowpool.py).

Shapes are named in comments: B batch, S source length, T target length, H heads,
K head dim, D model dim, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_mt.config import ModelConfig
from transformer_mt import matmul
from transformer_mt.tokenizer import PAD_ID

CACHE_BLOCKS = 4  # a beam search's self-attention cache is kept in up to this many blocks
NEG_INF = -1e9  # finite, so fully masked rows (all-pad batch rows) give a uniform softmax, not NaN


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' means bfloat16 on GPU/TPU and float32 on CPU, where bf16 matmuls are slower."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def linear_kwargs(dtype, rngs: nnx.Rngs) -> dict:
    """Keyword arguments of the model's nnx.Linear layers. Their products go through
    matmul.dot_general: bf16 inputs while the training loss is traced under matmul.matmul_inputs."""
    return dict(dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.xavier_uniform(),
                dot_general=matmul.dot_general)


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
    """[..., L] int -> [..., L, dim] float32: sin on the first half of features, cos on the second."""
    half = dim // 2
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al., 2021) on x [B, L, H, K] at positions [B|1, L]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, K/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dot_product_attention(q, k, v, mask, dropout_rate: float = 0.0, rngs: nnx.Rngs | None = None,
                          return_weights: bool = False):
    """softmax(q k^T / sqrt(K)) v with the softmax in float32.

    q [B, Tq, H, K], k/v [B, Tk, H, K], mask bool broadcastable to [B, H, Tq, Tk]. With
    return_weights, also the float32 weights [B, H, Tq, Tk] (before dropout), for inspection.
    """
    # The 1/sqrt(K) scale goes on q ([B, Tq, H, K]), not on the larger logits ([B, H, Tq, Tk]).
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits, NEG_INF)
    probs = weights = matmul.softmax_last(logits)
    if rngs is not None and dropout_rate > 0.0:
        keep, prob = keep_mask(rngs.dropout(), 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / prob, 0.0)
    out = jnp.einsum("bhqt,bthk->bqhk", weights.astype(v.dtype), v)
    return (out, probs) if return_weights else out


def keep_mask(key, keep_prob: float, shape) -> tuple[jax.Array, float]:
    """(bool mask with P(True) = keep_prob to 2**-32, that exact probability).

    Each element hashes its flat position with the key's two 32-bit words (a counter-based
    generator: murmur3's 32-bit finaliser, keyed twice), all in one fused elementwise pass;
    threefry's rounds ran as separate loops over materialised words and were 12% of a training
    step at the default size (benchmarks/RESULTS.md, issue 11). A pure function of key and
    position, so a resumed run draws the same masks."""
    threshold = min(max(round(keep_prob * 2.0**32), 1), 2**32 - 1)
    seed = jax.random.key_data(key).reshape(-1)
    position = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _mix32(_mix32(position * jnp.uint32(0x9E3779B9) ^ seed[0]) ^ seed[-1])
    return bits < jnp.uint32(threshold), threshold / 2.0**32


def _mix32(h):
    """murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout(x, rate: float, rngs: nnx.Rngs | None):
    """Inverted dropout; identity when rngs is None (evaluation and decoding)."""
    if rngs is None or rate == 0.0:
        return x
    keep, prob = keep_mask(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / prob, 0).astype(x.dtype)


def heads_major_attention(q, k, v, mask):
    """Decoding attention: q [B, Q, H, K] against heads-major k/v [B, H, L, K] -> [B, Q, H, K];
    mask bool broadcastable to [B, H, L, Q] (keys before queries).

    Same math as dot_product_attention (float32 softmax), in the layout XLA:CPU runs fastest for
    the shape (benchmarks/RESULTS.md): for one query (greedy), or several (beams) against a short
    cache or source (L <= 16), logits [B, H, Q, L] with the softmax over the last axis, 1.5-3x
    faster than keys-major; for several queries against a longer cache, logits [B, H, L, Q] and
    the weighted sum of values as a broadcast multiply and a sum over L, which was 1.5-2x faster
    than the batched dots there.
    """
    scale = math.sqrt(q.shape[-1])
    if q.shape[1] == 1 or k.shape[2] <= 16:
        logits = jnp.einsum("bqhk,bhtk->bhqt", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(jnp.swapaxes(mask, -1, -2), logits / scale, NEG_INF)
        weights = matmul.softmax_last(logits)  # [B, H, Q, L]
        out = jnp.einsum("bhqt,bhtk->bhqk", weights.astype(v.dtype), v)
    else:
        logits = jnp.einsum("bqhk,bhtk->bhtq", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits / scale, NEG_INF)
        weights = jax.nn.softmax(logits, axis=2)  # [B, H, L, Q]
        out = jnp.sum(weights.astype(v.dtype)[..., None] * v[:, :, :, None, :], axis=2)  # [B, H, Q, K]
    return out.transpose(0, 2, 1, 3)


def write_blocked(blocks, value, index, beams: int):
    """Writes value [B, H, N, K] (N = beams) at position index of a cache kept in blocks of
    equal length (each [B, H, block_len * N, K]): into the block that holds index; every other
    block rewrites its own entries at a clamped position (a few small ops, no block copied)."""
    size = blocks[0].shape[2]
    block_len = size // beams
    out = []
    for j, block in enumerate(blocks):
        pos = jnp.clip((index - j * block_len) * beams, 0, size - beams)
        current = jax.lax.dynamic_slice_in_dim(block, pos, beams, axis=2)
        fresh = jnp.where(index // block_len == j, value.astype(block.dtype), current)
        out.append(jax.lax.dynamic_update_slice_in_dim(block, fresh, pos, axis=2))
    return tuple(out)


def write_rows(buffer, value, positions):
    """buffer [B, H, L, K] with value [B, H, 1, K] written at each row's own position [B]
    (positions past L are dropped: a finished row that no longer moves)."""
    rows = jnp.arange(buffer.shape[0])
    return buffer.at[rows, :, positions].set(value[:, :, 0].astype(buffer.dtype), mode="drop")


def blocked_attention(q, k_blocks, v_blocks, mask, index):
    """heads_major_attention over only the blocks filled so far (index // block_len + 1 of them),
    one branch per count: the step reads the cache it needs, not the whole buffer, which for
    beams is the dominant memory traffic of a decoding step (benchmarks/RESULTS.md)."""
    size, beams = k_blocks[0].shape[2], q.shape[1]
    scale = math.sqrt(q.shape[-1])

    def attend(count):
        def branch(q, k_blocks, v_blocks, mask):
            logits = jnp.concatenate([jnp.einsum("bqhk,bhtk->bhtq", q, k, preferred_element_type=jnp.float32)
                                      for k in k_blocks[:count]], axis=2)  # [B, H, count * size, Q]
            logits = jnp.where(mask[:, :, : count * size], logits / scale, NEG_INF)
            weights = jax.nn.softmax(logits, axis=2)
            out = sum(jnp.sum(weights[:, :, i * size:(i + 1) * size, :, None].astype(v.dtype) * v[:, :, :, None, :],
                              axis=2) for i, v in enumerate(v_blocks[:count]))  # [B, H, Q, K]
            return out.transpose(0, 2, 1, 3)
        return branch

    branches = [attend(count) for count in range(1, len(k_blocks) + 1)]
    return jax.lax.switch(index // (size // beams), branches, q, k_blocks, v_blocks, mask)


def encoder_masks(src, src_mask, packing):
    """(src_mask bool [B, S], positions [B, S], self-attention mask) of an encoder input.

    src_mask defaults to src != PAD_ID; the mask is [B, 1, 1, S]. A packed batch (packing holds
    segment ids and positions, data.pack_batch) masks [B, 1, S, S]: each token attends only
    within its own pair, at positions counted from the pair's start."""
    if packing is not None:
        segments = packing["src_segments"]
        attn_mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B, 1, S, S]
        return segments != 0, packing["src_positions"], attn_mask
    if src_mask is None:
        src_mask = src != PAD_ID
    positions = jnp.broadcast_to(jnp.arange(src.shape[1]), src.shape)
    return src_mask, positions, src_mask[:, None, None, :]  # [B, 1, 1, S]


def decoder_masks(tgt_in, src_mask, packing):
    """(causal self-attention mask, cross-attention mask, positions [B, T]) for teacher forcing
    over tgt_in [B, T]: [1, 1, T, T] and [B, 1, 1, S], or, packed, [B, 1, T, T] and [B, 1, T, S]
    (within one pair: its own earlier tokens, its own source)."""
    T = tgt_in.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]  # [1, 1, T, T]
    if packing is not None:
        tgt_seg, src_seg = packing["tgt_segments"], packing["src_segments"]
        causal = causal & (tgt_seg[:, :, None] == tgt_seg[:, None, :])[:, None]  # [B, 1, T, T]
        cross_mask = ((tgt_seg[:, :, None] == src_seg[:, None, :]) & (src_seg != 0)[:, None, :])[:, None]
        return causal, cross_mask, packing["tgt_positions"]
    positions = jnp.broadcast_to(jnp.arange(T), tgt_in.shape)
    return causal, src_mask[:, None, None, :], positions


def cache_mask(slots, index):
    """Which self-attention cache entries each hypothesis sees at step `index`: (slots with
    every beam's entry at index recorded as its own, mask [B, 1, T * N, N]); for one hypothesis
    per sentence (N = 1), slots unchanged and the mask [1, 1, T, 1] of positions up to index."""
    batch, beams, max_len = slots.shape
    seen = jnp.arange(max_len) <= index  # [T]
    if beams == 1:
        return slots, seen[None, None, :, None]
    slots = jax.lax.dynamic_update_slice_in_dim(
        slots, jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[:, None], (batch, beams, 1)), index, 2)
    # Entry t * N + s is an ancestor of hypothesis j when slots[b, j, t] == s.
    mine = (slots[:, :, :, None] == jnp.arange(beams)) & seen[:, None]  # [B, N(j), T, N(s)]
    return slots, mine.transpose(0, 2, 3, 1).reshape(batch, 1, max_len * beams, beams)  # [B, 1, T*N, N]


class Attention(nnx.Module):
    """Multi-head attention projections; the attention itself is `dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, self.heads = cfg.d_model, cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.dropout_rate = cfg.attention_dropout
        kw = linear_kwargs(dtype, rngs)
        self.query = nnx.Linear(d, d, **kw)
        self.key = nnx.Linear(d, d, **kw)
        self.value = nnx.Linear(d, d, **kw)
        self.out = nnx.Linear(d, d, **kw)

    def split_heads(self, x):  # [B, L, D] -> [B, L, H, K]
        return x.reshape(x.shape[:-1] + (self.heads, self.head_dim))

    def project_q(self, x):
        return self.split_heads(self.query(x))

    def project_kv(self, x):
        return self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def attend(self, q, k, v, mask, rngs):
        """-> (output [B, Tq, D], weights [B, H, Tq, Tk]); the weights cost nothing unless used."""
        out, weights = dot_product_attention(q, k, v, mask, self.dropout_rate, rngs, return_weights=True)
        return self.out(out.reshape(out.shape[:-2] + (-1,))), weights

    def attend_cached(self, q, k, v, mask, index=None):
        """Decoding attention over a cache: one buffer, or blocks (tuples) read up to index."""
        if isinstance(k, tuple):
            out = blocked_attention(q, k, v, mask, index)
        else:
            out = heads_major_attention(q, k, v, mask)  # [B, Q, H, K]
        return self.out(out.reshape(out.shape[:-2] + (-1,)))


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        kw = linear_kwargs(dtype, rngs)
        self.inner = nnx.Linear(cfg.d_model, cfg.ffn_dim, **kw)
        self.outer = nnx.Linear(cfg.ffn_dim, cfg.d_model, **kw)
        self.rate = cfg.activation_dropout

    def __call__(self, x, rngs):
        return self.outer(dropout(jax.nn.relu(self.inner(x)), self.rate, rngs))


class Residual(nnx.Module):
    """x + dropout(f(LN(x))) when pre_norm, else LN(x + dropout(f(x)))."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.pre_norm, self.rate = cfg.pre_norm, cfg.dropout

    def __call__(self, x, f, rngs):
        if self.pre_norm:
            return x + dropout(f(matmul.layer_norm(self.norm, x)), self.rate, rngs)
        return matmul.layer_norm(self.norm, x + dropout(f(x), self.rate, rngs))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype, rngs)
        self.ffn = FeedForward(cfg, dtype, rngs)
        self.attn_block = Residual(cfg, dtype, rngs)
        self.ffn_block = Residual(cfg, dtype, rngs)
        self.rotary = cfg.positional == "rotary"

    def __call__(self, x, mask, positions, rngs, return_weights: bool = False):
        """x [B, S, D] -> x, or (x, self-attention weights [B, H, S, S]) with return_weights."""
        weights = {}

        def self_attention(h):
            q, (k, v) = self.self_attn.project_q(h), self.self_attn.project_kv(h)
            if self.rotary:
                q, k = apply_rotary(q, positions), apply_rotary(k, positions)
            out, weights["self"] = self.self_attn.attend(q, k, v, mask, rngs)
            return out

        x = self.attn_block(x, self_attention, rngs)
        x = self.ffn_block(x, lambda h: self.ffn(h, rngs), rngs)
        return (x, weights["self"]) if return_weights else x


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype, rngs)
        self.cross_attn = Attention(cfg, dtype, rngs)
        self.ffn = FeedForward(cfg, dtype, rngs)
        self.self_block = Residual(cfg, dtype, rngs)
        self.cross_block = Residual(cfg, dtype, rngs)
        self.ffn_block = Residual(cfg, dtype, rngs)
        self.rotary = cfg.positional == "rotary"

    def __call__(self, x, self_mask, cross_kv, cross_mask, positions, rngs, return_weights: bool = False):
        """Teacher forcing: x [B, T, D] attends to itself under self_mask and to cross_kv.

        With return_weights: (x, (self weights [B, H, T, T], cross weights [B, H, T, S])).
        """
        weights = {}

        def self_attention(h):
            q, (k, v) = self.self_attn.project_q(h), self.self_attn.project_kv(h)
            if self.rotary:
                q, k = apply_rotary(q, positions), apply_rotary(k, positions)
            out, weights["self"] = self.self_attn.attend(q, k, v, self_mask, rngs)
            return out

        def cross_attention(h):
            out, weights["cross"] = self.cross_attn.attend(self.cross_attn.project_q(h), *cross_kv, cross_mask, rngs)
            return out

        x = self.self_block(x, self_attention, rngs)
        x = self.cross_block(x, cross_attention, rngs)
        x = self.ffn_block(x, lambda h: self.ffn(h, rngs), rngs)
        return (x, (weights["self"], weights["cross"])) if return_weights else x

    def step(self, x, cache, offset, self_mask, cross_k, cross_v, cross_mask, positions):
        """Incremental decoding of x [B, N, D] (N hypotheses per sentence, all at position offset):
        writes their keys/values at entries offset * N .. offset * N + N-1 of cache k/v
        [B, H, L, K] (or of its blocks, see Transformer.init_cache). offset [B] (one hypothesis
        a row): each row writes at its own position (decode_rows)."""
        new = {}

        def self_attention(h):
            q, (k, v) = self.self_attn.project_q(h), self.self_attn.project_kv(h)  # [B, N, H, K]
            if self.rotary:
                q, k = apply_rotary(q, positions), apply_rotary(k, positions)
            for name, value in (("k", k), ("v", v)):
                value = value.transpose(0, 2, 1, 3)
                if isinstance(cache[name], tuple):  # beams: blocked cache, read only where filled
                    new[name] = write_blocked(cache[name], value, offset, q.shape[1])
                elif jnp.ndim(offset) == 1:  # rows at positions of their own
                    new[name] = write_rows(cache[name], value, offset)
                else:
                    new[name] = jax.lax.dynamic_update_slice_in_dim(
                        cache[name], value.astype(cache[name].dtype), offset * q.shape[1], 2)
            return self.self_attn.attend_cached(q, new["k"], new["v"], self_mask, offset)

        def cross_attention(h):
            return self.cross_attn.attend_cached(self.cross_attn.project_q(h), cross_k, cross_v, cross_mask)

        x = self.self_block(x, self_attention, None)
        x = self.cross_block(x, cross_attention, None)
        return self.ffn_block(x, lambda h: self.ffn(h, None), None), new


class IncrementalDecoding:
    """Transformer's decoding half: `cross_state` + `init_cache` + `decode_step` (+
    `reorder_cache` for beams), step by step with a cache, as search.py runs them. Reads the
    Transformer's cfg, dtype, decoder_layers, tgt_embed, _embed, _features, _project, _logits and
    output_weight; holds no state.

    Rows are sentences x beams, [B * N] in the search's order (N = 1 for greedy). Keys and values
    are kept heads-major, [B, H, L, K], the layout the attention dots read without a transpose.
    Cross-attention keys/values are projected once per sentence and shared by its beams. The
    self-attention cache holds every beam's entries in one buffer per layer, position-major
    ([B, H, max_len * N, K]: entry t * N + j is beam j at position t); an entry is written once
    and never moved. `slots` [B, N, max_len] says, for each hypothesis, which beam's entry at
    each position is its ancestor; a beam reorder gathers only these ints (`reorder_cache`).
    With beams and max_len >= 8 that buffer is split into CACHE_BLOCKS blocks of positions, each
    its own array, and a step attends over the blocks filled so far only (`blocked_attention`):
    reading the whole buffer every step was a quarter of a beam step.
    """

    def cross_state(self, encoded, src_mask):
        """Per-sentence decoding inputs: cross keys/values [B, H, S, K] of every layer and the mask."""
        layers = []
        for layer in self.decoder_layers:
            k, v = layer.cross_attn.project_kv(encoded)  # [B, S, H, K]
            layers.append((k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)))
        return {"layers": tuple(layers), "mask": src_mask[:, None, :, None]}  # mask [B, 1, S, 1]

    def init_cache(self, batch_size: int, beam_size: int, max_len: int):
        """Empty self-attention cache for batch_size sentences of beam_size hypotheses each."""
        heads, head_dim = self.cfg.num_heads, self.cfg.d_model // self.cfg.num_heads
        if beam_size > 1 and max_len >= 2 * CACHE_BLOCKS:  # up to CACHE_BLOCKS blocks of positions
            block_len = -(-max_len // CACHE_BLOCKS)
            max_len = -(-max_len // block_len) * block_len
            shape = (batch_size, heads, block_len * beam_size, head_dim)
            zeros = lambda: tuple(jnp.zeros(shape, self.dtype) for _ in range(max_len // block_len))  # noqa: E731
        else:
            shape = (batch_size, heads, max_len * beam_size, head_dim)
            zeros = lambda: jnp.zeros(shape, self.dtype)  # noqa: E731
        layers = tuple({"k": zeros(), "v": zeros()} for _ in self.decoder_layers)
        slots = jnp.zeros((batch_size, beam_size, max_len), jnp.int32)
        return {"layers": layers, "slots": slots, "index": jnp.zeros((), jnp.int32)}

    @staticmethod
    def reorder_cache(cache, parents):
        """After a beam step: hypothesis j of sentence b continues parents[b, j] ([B, N] int)."""
        slots = jnp.take_along_axis(cache["slots"], parents[:, :, None], axis=1)
        return {**cache, "slots": slots}

    def decode_step(self, ids, cache, cross):
        """One step: ids [B * N] at position cache['index'] -> (float32 logits [B * N, V], cache)."""
        x, cache = self._step(ids, cache, cross)
        return self._logits(x).reshape(ids.shape[0], -1), cache

    def decode_argmax_step(self, ids, cache, cross, banned_ids=()):
        """One step -> (int32 [B * N], cache): each row's first best token outside banned_ids, as
        decode.first_argmax of decode_step's logits. Where the int8 kernel runs the output
        projection, it picks them while computing it (greedy search without scores: the logits
        are never written)."""
        x, cache = self._step(ids, cache, cross)
        h = self._features(x)
        chosen = matmul.int8_argmax(h, *self.output_weight(), banned_ids)
        if chosen is None:
            from transformer_mt.decode import first_argmax

            return first_argmax(self._project(h).reshape(ids.shape[0], -1), banned_ids), cache
        return chosen.reshape(-1), cache

    def _step(self, ids, cache, cross):
        """One step of the decoder stack: (output [B, N, D], cache moved one position on)."""
        index, slots = cache["index"], cache["slots"]
        batch, beams, max_len = slots.shape
        positions = jnp.full((batch, beams), index)
        x = self._embed(self.tgt_embed, ids.reshape(batch, beams), positions, None)  # [B, N, D]
        slots, self_mask = cache_mask(slots, index)
        new_layers = []
        for layer, layer_cache, (cross_k, cross_v) in zip(self.decoder_layers, cache["layers"], cross["layers"]):
            x, layer_cache = layer.step(x, layer_cache, index, self_mask, cross_k, cross_v,
                                        cross["mask"], positions)
            new_layers.append(layer_cache)
        return x, {"layers": tuple(new_layers), "slots": slots, "index": index + 1}

    def init_row_cache(self, batch_size: int, max_len: int):
        """Empty self-attention cache for batch_size rows that each move at their own position
        (decode_rows): every row starts at position 0."""
        shape = (batch_size, self.cfg.num_heads, max_len, self.cfg.d_model // self.cfg.num_heads)
        layers = tuple({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                       for _ in self.decoder_layers)
        return {"layers": layers, "positions": jnp.zeros((batch_size,), jnp.int32)}

    def decode_rows(self, ids, cache, cross):
        """One greedy step of rows that each sit at their own position, cache['positions'] [B]:
        ids [B] -> (float32 logits [B, V], cache with every position one further). The same
        math per row as decode_step (a row sees its own entries up to its position), so a
        sentence that joins a running batch gets the translation it gets in a batch of its own."""
        positions = cache["positions"]
        max_len = cache["layers"][0]["k"].shape[2]
        x = self._embed(self.tgt_embed, ids[:, None], positions[:, None], None)  # [B, 1, D]
        self_mask = (jnp.arange(max_len)[None, :] <= positions[:, None])[:, None, :, None]  # [B, 1, L, 1]
        new_layers = []
        for layer, layer_cache, (cross_k, cross_v) in zip(self.decoder_layers, cache["layers"], cross["layers"]):
            x, layer_cache = layer.step(x, layer_cache, positions, self_mask, cross_k, cross_v,
                                        cross["mask"], positions[:, None])
            new_layers.append(layer_cache)
        return self._logits(x)[:, 0], {"layers": tuple(new_layers), "positions": positions + 1}


class Transformer(IncrementalDecoding, nnx.Module):
    """Encoder-decoder Transformer with optional tied embeddings: teacher forcing here,
    step-by-step decoding in IncrementalDecoding."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = compute_dtype(cfg.dtype)
        self.dtype = dtype
        self.matmul_dtype = matmul.resolve_matmul_dtype(cfg.matmul_dtype, dtype)  # of training's matmuls
        init = nnx.initializers.normal(stddev=cfg.d_model**-0.5)  # unit variance after sqrt(D) scaling
        self.src_embed = nnx.Embed(src_vocab_size, cfg.d_model, dtype=dtype, embedding_init=init, rngs=rngs)
        if cfg.tie_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise ValueError("tied embeddings need one joint vocabulary")
            self.tgt_embed = self.src_embed
            self.output = None
        else:
            self.tgt_embed = nnx.Embed(tgt_vocab_size, cfg.d_model, dtype=dtype, embedding_init=init, rngs=rngs)
            self.output = nnx.Linear(cfg.d_model, tgt_vocab_size, use_bias=False, dtype=dtype, rngs=rngs,
                                     dot_general=matmul.dot_general)
        self.encoder_layers = nnx.List([EncoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_encoder_layers)])
        self.decoder_layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_decoder_layers)])
        # Pre-norm stacks end with a LayerNorm; post-norm layers already end normalised.
        self.encoder_norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=dtype, rngs=rngs) if cfg.pre_norm else None
        self.decoder_norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=dtype, rngs=rngs) if cfg.pre_norm else None

    # ------------------------------------------------------------------ pieces

    def _embed(self, embed: nnx.Embed, ids, positions, rngs, table_len: int | None = None):
        """Scaled embeddings plus sinusoids of positions; with table_len (every position below
        it), the sinusoids are a table of table_len rows, gathered: a packed batch's positions
        then cost one lookup per token, not a sin and a cos per feature."""
        x = embed(ids) * jnp.asarray(math.sqrt(self.cfg.d_model), self.dtype)  # [B, L, D]
        if self.cfg.positional == "sinusoidal":
            if table_len is not None:
                pos = sinusoidal_positions(jnp.arange(table_len), self.cfg.d_model)[positions]
            else:
                pos = sinusoidal_positions(positions, self.cfg.d_model)
            x = x + pos.astype(self.dtype)
        return dropout(x, self.cfg.dropout, rngs)

    def _features(self, h):
        """Decoder output [B, T, D] -> what the output projection reads (the final norm applied)."""
        return h if self.decoder_norm is None else matmul.layer_norm(self.decoder_norm, h)

    def _logits(self, h):
        """[B, T, D] -> float32 [B, T, V]."""
        return self._project(self._features(h))

    def _project(self, h):
        """The output projection of features [B, T, D] -> float32 [B, T, V]."""
        if self.output is not None:
            logits = self.output(h)
        elif matmul.reduced_inputs():  # decoding in bf16/int8: the tied projection too, its largest matmul
            logits = matmul.dot_general(h, self.tgt_embed.embedding[...], (((h.ndim - 1,), (1,)), ((), ())))
        else:
            logits = self.tgt_embed.attend(h)
        return logits.astype(jnp.float32)

    def output_weight(self) -> tuple:
        """(weight, transposed) of the output projection: the tied table [V, D] used transposed, or
        the output layer's kernel [D, V]."""
        return (self.tgt_embed.embedding[...], True) if self.output is None else (self.output.kernel[...], False)

    def decoding_weights(self) -> list:
        """(weight, transposed) of every product that int8 decoding runs with quantised weights:
        the Linear layers' kernels [K, N], and the tied output projection's table [V, D], used
        transposed (int8_kernel packs them once per params)."""
        weights = [(m.kernel[...], False) for _, m in nnx.iter_modules(self) if isinstance(m, nnx.Linear)]
        if self.output is None:
            weights.append((self.tgt_embed.embedding[...], True))
        return weights

    def output_embedding(self):
        """The output projection as [V, D] in the compute dtype: logits = features @ it.T."""
        table = self.tgt_embed.embedding[...] if self.output is None else self.output.kernel[...].T
        return table.astype(self.dtype)

    # ------------------------------------------------------------------ entry points

    def encode(self, src, rngs: nnx.Rngs | None = None, src_mask=None, return_weights: bool = False,
               packing=None):
        """src [B, S] -> (encoded [B, S, D], src_mask bool [B, S]). Dropout only when rngs given.

        src_mask defaults to src != PAD_ID; positions outside it are never attended to.
        return_weights adds a third item: each layer's self-attention weights [B, H, S, S].
        packing: a packed batch's segment ids and positions (data.pack_batch); each token then
        attends only within its own pair, at positions counted from the pair's start.
        """
        src_mask, positions, attn_mask = encoder_masks(src, src_mask, packing)
        x = self._embed(self.src_embed, src, positions, rngs, table_len=src.shape[1])
        weights = []
        for layer in self.encoder_layers:
            x, w = layer(x, attn_mask, positions, rngs, return_weights=True)
            weights.append(w)
        if self.encoder_norm is not None:
            x = matmul.layer_norm(self.encoder_norm, x)
        return (x, src_mask, tuple(weights)) if return_weights else (x, src_mask)

    def decode(self, tgt_in, encoded, src_mask, rngs: nnx.Rngs | None = None, return_weights: bool = False):
        """Teacher forcing: tgt_in [B, T] -> float32 logits [B, T, V]; position t sees tgt_in[:, :t+1].

        With return_weights: (logits, {"self": per layer [B, H, T, T], "cross": per layer [B, H, T, S]}).
        """
        x, weights = self._decoder_states(tgt_in, encoded, src_mask, rngs)
        logits = self._logits(x)
        if return_weights:
            return logits, {"self": tuple(w[0] for w in weights), "cross": tuple(w[1] for w in weights)}
        return logits

    def features(self, src, tgt_in, rngs: nnx.Rngs | None = None, packing=None):
        """Teacher forcing up to the output projection: [B, T, D] with logits = features @
        output_embedding().T; the training loss projects them itself, a chunk at a time.
        packing: as in `encode`, for a packed batch."""
        encoded, src_mask = self.encode(src, rngs, packing=packing)
        return self._features(self._decoder_states(tgt_in, encoded, src_mask, rngs, packing)[0])

    def _decoder_states(self, tgt_in, encoded, src_mask, rngs, packing=None):
        """The decoder stack's output [B, T, D] (before the final norm) and each layer's weights."""
        causal, cross_mask, positions = decoder_masks(tgt_in, src_mask, packing)
        x = self._embed(self.tgt_embed, tgt_in, positions, rngs, table_len=tgt_in.shape[1])
        weights = []
        for layer in self.decoder_layers:
            cross = layer.cross_attn.project_kv(encoded)
            x, w = layer(x, causal, cross, cross_mask, positions, rngs, return_weights=True)
            weights.append(w)
        return x, weights

    def __call__(self, src, tgt_in, rngs: nnx.Rngs | None = None):
        encoded, src_mask = self.encode(src, rngs)
        return self.decode(tgt_in, encoded, src_mask, rngs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
