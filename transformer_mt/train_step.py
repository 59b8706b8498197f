"""Pure training and evaluation steps: (state, batch) -> (state, metrics).

The train state is one pytree {params, opt_state, step, rng}; jit, shardings and buffer
donation are applied once, in the trainer. Dropout randomness is fold_in(rng, step), so a
resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer_mt.config import TrainConfig
from transformer_mt.data import PACKED_KEYS
from transformer_mt.losses import projected_label_smoothed_xent
from transformer_mt.matmul import matmul_inputs
from transformer_mt.tokenizer import PAD_ID

State = dict[str, Any]


def inverse_sqrt_schedule(peak_lr: float, warmup_steps: int) -> Callable:
    """Linear warmup to peak_lr, then decay with 1/sqrt(step) (Vaswani et al., 2017)."""
    warmup = max(warmup_steps, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return peak_lr * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The TrainConfig fields that shape the optimizer: equal settings give an identical program."""

    learning_rate: float
    warmup_steps: int
    adam_b1: float
    adam_b2: float
    adam_eps: float
    weight_decay: float
    clip_norm: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> "OptimizerSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def make_optimizer(cfg: TrainConfig | OptimizerSettings) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; weight decay only on matrices (not biases, norms)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(
            inverse_sqrt_schedule(cfg.learning_rate, cfg.warmup_steps),
            b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, mask=decay_mask,
        ),
    )


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, State]:
    graphdef, params = nnx.split(model, nnx.Param)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
    return graphdef, state


def batch_sums(params, graphdef, batch, dropout_key, smoothing: float, kernel_transposes: bool = False):
    """Summed loss over a batch and its metrics; dropout when dropout_key is not None.
    kernel_transposes: bf16 weight gradients by matmul.weight_grad's kernel route (one device)."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    packing = {k: batch[k] for k in PACKED_KEYS} if PACKED_KEYS[0] in batch else None
    with matmul_inputs(model.matmul_dtype, kernel_transposes):  # bf16 matmul inputs where configured (mixed precision)
        features = model.features(batch["src"], batch["tgt_in"], rngs=rngs, packing=packing)  # [B, T, D]
    weights = batch["tgt_out"] != PAD_ID
    loss_sum, nll_sum, correct = projected_label_smoothed_xent(
        features.reshape(-1, features.shape[-1]), model.output_embedding(), batch["tgt_out"].reshape(-1),
        weights.reshape(-1), smoothing, matmul_dtype=model.matmul_dtype, kernel_transposes=kernel_transposes)
    metrics = {"loss_sum": loss_sum, "nll_sum": nll_sum, "tokens": jnp.sum(weights).astype(jnp.float32),
               "correct": correct}
    return loss_sum, metrics


def micro_grads(state: State, batch, micro_index, *, graphdef, smoothing: float, kernel_transposes: bool = False):
    """Gradient of the summed loss on one micro-batch (not yet divided by the token count)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]), micro_index)
    grad_fn = jax.grad(batch_sums, has_aux=True)
    return grad_fn(state["params"], graphdef, batch, key, smoothing, kernel_transposes)


def apply_grads(state: State, grads, metrics, *, tx, skip_nonfinite: bool = True):
    """Divides summed grads by the batch's target tokens and updates; a non-finite step is skipped."""
    tokens = jnp.maximum(metrics["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss_sum"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if skip_nonfinite:
        keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep_old, params, state["params"])
        opt_state = jax.tree.map(keep_old, opt_state, state["opt_state"])
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    out = {
        "loss": metrics["loss_sum"] / tokens,
        "nll": metrics["nll_sum"] / tokens,
        "accuracy": metrics["correct"] / tokens,
        "tokens": metrics["tokens"],
        "grad_norm": grad_norm,
        "finite": finite,
    }
    return new_state, out


def train_step(state: State, batch, *, graphdef, tx, smoothing: float, kernel_transposes: bool = False):
    """One optimizer step on one batch: the fused form of micro_grads + apply_grads."""
    grads, metrics = micro_grads(state, batch, 0, graphdef=graphdef, smoothing=smoothing,
                                 kernel_transposes=kernel_transposes)
    return apply_grads(state, grads, metrics, tx=tx)


def accumulate(acc, grads, metrics):
    """Adds one micro-batch's summed grads and metrics to the running totals."""
    return jax.tree.map(jnp.add, acc, (grads, metrics))


def eval_step(params, batch, *, graphdef, smoothing: float):
    """Summed validation loss/metrics without dropout."""
    _, metrics = batch_sums(params, graphdef, batch, None, smoothing)
    return metrics


def bind(fn, **static):
    return functools.partial(fn, **static)
