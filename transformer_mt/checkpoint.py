"""Checkpoints through orbax's CheckpointManager: arrays plus JSON, never pickle.

A checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON record
(data position, resolved config, validation history). Orbax writes into a temporary directory
and renames it on commit, so a process killed mid-save leaves no checkpoint that a later
manager would list (its temporary directory is removed on the next start); older checkpoints are
untouched. A step directory damaged some other way (a disk error, an interrupted copy) fails
to restore: `restore_newest` then moves it aside and falls back to the one before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_mt import params_cache
from transformer_mt.config import ConfigError


def _orbax():
    """orbax.checkpoint, imported when a checkpoint is first written or restored through it (a
    translation that finds its params in params_cache never imports it: ~0.2 s)."""
    import orbax.checkpoint

    return orbax.checkpoint


class CheckpointMismatch(ConfigError):
    """The checkpoint is readable but holds a different model (config or tokenizer changed)."""


class CheckpointDamaged(Exception):
    """A listed checkpoint that cannot be read back (a truncated file, a disk error)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only directory); older ones are intact."""


class Checkpoints:
    """The checkpoints of one run directory (`<run>/checkpoints`, or `<run>/best`)."""

    def __init__(self, directory: str | Path, keep: int = 3, create: bool = True):
        """create=False: for reading; the orbax manager (which removes unfinished saves' temporary
        directories when it starts, a training's in-flight save included) is made only if a
        method needs it."""
        self.directory = Path(directory).absolute()
        self.keep, self.create = keep, create
        self._manager = None
        if create:
            self.manager  # noqa: B018 (made now: a writer cleans up and creates the directory at once)

    @property
    def manager(self):
        if self._manager is None:
            ocp = _orbax()
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=self.create,
                                                   enable_async_checkpointing=True, cleanup_tmp_directories=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def steps(self) -> list[int]:
        if self._manager is not None:
            return sorted(self._manager.all_steps())
        # Reading: the finished steps are the directories named by a number (orbax writes a step
        # under a temporary name and renames it once whole).
        try:
            return sorted(int(e.name) for e in os.scandir(self.directory) if e.name.isdigit() and e.is_dir())
        except OSError:
            return []

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        """Starts writing `step` in the background (an earlier save's failure is raised here)."""
        ocp = _orbax()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except Exception as e:
            raise write_error(self.directory, e) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise write_error(self.directory, e) from None

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """Restores onto `target` (arrays or ShapeDtypeStructs carrying shardings).

        Raises CheckpointMismatch for another model's checkpoint, CheckpointDamaged for one that
        cannot be read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.directory}")
        ocp = _orbax()
        with self._reading(step, target):
            abstract = jax.tree.map(_abstract, target)
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        return restored["state"], restored["meta"]

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the "params" of a checkpoint's train state, onto target (the params' arrays or
        ShapeDtypeStructs carrying shardings): a partial restore that skips the optimizer state,
        ~5x faster than `restore` (0.2 vs 1.0 s for the default model), which a translation's
        start-up pays. Raises like `restore`."""
        step_dir = self.directory / str(step)
        with self._reading(step, {"params": target}):
            cached = params_cache.load(step_dir, target)
            if cached is not None:
                return cached
            ocp = _orbax()
            abstract = {"params": jax.tree.map(_abstract, target)}
            restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
            restored = ocp.PyTreeCheckpointer().restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True))
        params_cache.save(step_dir, target, restored["params"])
        return restored["params"]

    @contextlib.contextmanager
    def _reading(self, step: int, target: Any):
        """Around a restore of `step` onto target: the step must exist and match target's shapes
        (ConfigError, CheckpointMismatch); any other failure to read it becomes CheckpointDamaged."""
        if step not in self.steps():
            raise ConfigError(f"no checkpoint for step {step} in {self.directory} (have {self.steps()})")
        try:
            yield
        except ConfigError:
            raise
        except Exception as e:  # orbax/tensorstore report damage with many exception types
            # Another model's checkpoint fails too (orbax restores shapes strictly): name the first
            # array that differs. Read only after a failure: the metadata of every array costs as
            # long as the restore itself (0.5-1 s), which each translation's start paid.
            try:
                self.check_matches(step, target)
            except ConfigError:  # CheckpointMismatch: readable, but another model
                raise
            except Exception:
                pass
            raise CheckpointDamaged(f"checkpoint {self.directory}/{step} cannot be restored ({error_line(e)})") from e

    def check_matches(self, step: int, target: Any) -> None:
        """Raises CheckpointMismatch naming the first array whose shape differs from target's
        (a target of some top-level entries of the train state is compared with those only)."""
        saved = self.array_metadata(step)
        if isinstance(target, dict) and hasattr(saved, "keys"):
            saved = {k: saved[k] for k in saved.keys() if k in target}
        difference = first_difference(target, saved)
        if difference:
            raise CheckpointMismatch(f"checkpoint {self.directory}/{step} does not match the model: {difference}; "
                                     "was config.yaml or the tokenizer (spm*.model) of this run changed?")

    def array_metadata(self, step: int) -> Any:
        """Shapes and dtypes of the saved train state, read without restoring any array."""
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # orbax warns that the sub-item has no top-level metadata file
        try:
            return _orbax().StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        finally:
            absl_log.setLevel(level)

    def restore_newest(self, target: Any, move_aside: bool = True) -> tuple[Any, dict, int] | None:
        """(state, meta, step) from the newest checkpoint that restores, or None if there is none.

        A damaged step directory is skipped with a warning. With move_aside (training), it is
        moved to `<directory>.damaged/` so that a later save of the same step cannot collide
        with it; nothing is deleted.
        """
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, target)
                return state, meta, step
            except CheckpointDamaged as e:
                note = str(e)
                if move_aside:
                    note += f"; moved to {self._move_aside(step)}"
                print(f"warning: {note}; trying the previous one", file=sys.stderr, flush=True)
        return None

    def _move_aside(self, step: int) -> Path:
        """Moves a damaged step directory to `<directory>.damaged/<step>-<time>` (nothing is
        deleted), so that a later save of the same step cannot collide with it."""
        aside = self.directory.with_name(self.directory.name + ".damaged") / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), aside)
        self.manager.reload()
        return aside

    def delete_after(self, step: int) -> None:
        """Removes checkpoints newer than `step` (left by a run that is being resumed from `step`)."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def read_state(self, step: int) -> Any:
        """The saved train state as host numpy arrays, whatever devices wrote it (inspection, tests)."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        meta = self.array_metadata(step)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        state, _ = self.restore(step, target)
        return jax.tree.map(np.asarray, state)

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.directory}")
        ocp = _orbax()
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        if self._manager is None:  # only read: nothing to wait for
            return
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            raise write_error(self.directory, e) from None


class _FromOrbax(logging.Filter):
    """Drops error records from orbax's background threads and the asyncio futures it abandons:
    Checkpoints reports the failure once (CheckpointWriteError, or a skipped damaged checkpoint),
    not once per array. (Only orbax runs asyncio in this package.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "never retrieved" not in record.getMessage()
        return "orbax" not in record.pathname and "orbax" not in record.getMessage()


def quiet_orbax_background_errors() -> None:
    """For the command line: when a checkpoint cannot be written or read, orbax's threads log each
    failed array (and asyncio each failed task); the user gets one CheckpointWriteError line, or
    the warning that a damaged checkpoint was skipped, instead."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FromOrbax) for f in logger.filters):
            logger.addFilter(_FromOrbax())
    # After one array fails, orbax abandons the others: its coroutines report their own failures
    # as "exception ignored" when collected, tensorstore's completions find the event loop
    # closed, and the never-awaited coroutines warn at exit. (This package runs no coroutines.)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "quiet_orbax", False):
        return

    def hook(unraisable):
        if not _orbax_leftover(unraisable):
            previous(unraisable)

    hook.quiet_orbax = True
    sys.unraisablehook = hook


def _orbax_leftover(unraisable) -> bool:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    tb = unraisable.exc_traceback
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def write_error(directory: Path, e: Exception) -> CheckpointWriteError:
    """A failed save in one line: the step, the reason (an OS error's name and errno where orbax
    or tensorstore report one) and the newest checkpoint that is complete on disk."""
    message = "\n".join(str(x) for x in _chain(e))
    failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", message)
    what = f"checkpoint {failed.group(1)}" if failed else "a checkpoint"
    newest = complete_steps(directory)
    kept = f"newest complete checkpoint: step {newest[-1]}" if newest else "no complete checkpoint yet"
    return CheckpointWriteError(f"cannot write {what} in {directory}: {write_reason(e)}; {kept}")


# Errors a save meets on a full, read-only or failing disk, by the text the C library gives them.
_DISK_ERRNOS = [getattr(errno, name) for name in
                ("ENOSPC", "EFBIG", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EMFILE", "ENAMETOOLONG")
                if hasattr(errno, name)]


def write_reason(e: BaseException) -> str:
    """Why a save failed, without the paths: tensorstore nests its causes ("writing X: writing Y:
    Failed to write N bytes: File too large [os_error_code=27]") and orbax may wrap them again, in
    an exception group or a chained exception, so the whole chain is searched."""
    chain = _chain(e)
    for x in chain:
        if isinstance(x, OSError) and x.strerror:
            return f"{x.strerror} (errno {x.errno})"
    text = "\n".join(str(x) for x in chain)
    coded = re.search(r"([A-Z][A-Za-z ]+?) ?\[os_error_code='?(\d+)", text)
    if coded:
        return f"{coded.group(1)} (errno {coded.group(2)})"
    for code in _DISK_ERRNOS:
        if os.strerror(code) in text:
            return f"{os.strerror(code)} (errno {code})"
    line = error_line(e, limit=None)
    return line if len(line) <= 300 else "... " + line[-296:]


def _chain(e: BaseException) -> list[BaseException]:
    """`e`, its causes and contexts, and the members of exception groups, each once."""
    seen, todo, out = set(), [e], []
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return out


def complete_steps(directory: Path) -> list[int]:
    """Steps committed on disk, read from the directory alone (no manager, which would clean up
    a save in progress): orbax renames a step's temporary directory only once it is whole."""
    try:
        return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
    except OSError:
        return []


def first_difference(model: Any, checkpoint: Any,
                     names: tuple[str, str] = ("the model", "the checkpoint")) -> str | None:
    """The first array (by path) missing on one side or differing in shape, in words; None if none.
    `names` say what the two trees are."""
    want = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(model)[0]}
    have = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(checkpoint)[0]}
    for key in sorted(set(want) | set(have)):
        if key not in have or key not in want:
            return f"{key} only in {names[0] if key not in have else names[1]}"
        if tuple(want[key].shape) != tuple(have[key].shape):
            return f"{key} has shape {tuple(have[key].shape)} in {names[1]}, {tuple(want[key].shape)} in {names[0]}"
    return None


def error_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message (orbax and tensorstore messages run long)."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(" See full TensorStore details")[0][:limit]


def _path(keys) -> str:
    """'params/encoder_layers/0/attn/kernel/value' whether the tree holds dicts, lists or namedtuples."""
    names = []
    for k in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
