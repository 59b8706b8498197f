"""Checkpoints through orbax's CheckpointManager: arrays plus JSON, never pickle.

A checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON record
(data position, resolved config, validation history). Orbax writes into a temporary directory
and renames it on commit, so a process killed mid-save leaves no checkpoint that a later
manager would list; older checkpoints are untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_mt.config import ConfigError


class Checkpoints:
    """The checkpoints of one run directory (`<run>/checkpoints`, or `<run>/best`)."""

    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """Restores onto `target` (arrays or ShapeDtypeStructs carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.directory}")
        if step not in self.steps():
            raise ConfigError(f"no checkpoint for step {step} in {self.directory} (have {self.steps()})")
        abstract = jax.tree.map(_abstract, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def read_state(self, step: int) -> Any:
        """The saved train state as host numpy arrays, whatever devices wrote it (inspection, tests)."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        state, _ = self.restore(step, target)
        return jax.tree.map(np.asarray, state)

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
