"""Every partitioning decision in one place.

The mesh has a "data" axis (batch rows are split over it) and a "model" axis of size 1, kept
so tensor or FSDP sharding of parameters can later be added here without touching the trainer.
Parameters and optimizer state are replicated; batches are sharded along "data".
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job through jax.distributed when the environment describes one.

    Set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run where JAX
    auto-detects the cluster: TPU pods, SLURM, Open MPI and set TRANSFORMER_MT_DISTRIBUTED=1).
    Must run before anything touches a jax backend. CPU processes reduce through gloo, the
    default of jax_cpu_collectives_implementation in jax 0.10.2 (tests/test_distributed.py).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TRANSFORMER_MT_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def split_cpu(count: int) -> int | None:
    """Makes the host CPU `count` JAX devices (at most one per core), so that decoding splits
    each batch's rows over them and their small per-step operations run side by side: on the
    2-core CPU of benchmarks/RESULTS.md two devices decode 1.2-1.4x faster than one device using
    both cores. Must run before JAX starts its backends. Returns the device count set, or None
    when left alone: count < 2, XLA_FLAGS sets the host device count itself, a multi-host job, or
    backends already running (a process that already computed something)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    count = min(count, cores)
    if (count < 2 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TRANSFORMER_MT_DISTRIBUTED") == "1"):
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends already run with their devices
        return None
    return count


def make_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1, 1), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def data_size(mesh: Mesh) -> int:
    """How many ways a batch is split: global batch rows must be a multiple of this."""
    return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def state_sharding(mesh: Mesh, state):
    """Parameters and optimizer state: replicated (the place to add a model-axis rule)."""
    return jax.tree.map(lambda _: replicated(mesh), state)


def put_state(mesh: Mesh, state):
    return jax.device_put(state, state_sharding(mesh, state))


def put_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]):
    """This process's rows -> global arrays sharded along "data" (works on one or many hosts)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # one batched transfer: half the time of an array at a time
        return jax.device_put(local_batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
