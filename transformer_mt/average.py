"""`average`: the mean of several checkpoints' parameters, written as a run directory.

Averaging the last few checkpoints (Vaswani et al., 2017) or the best few usually gains a
little BLEU for free. The output is a run like any other (config and tokenizer copied, one
checkpoint), so `translate`, `evaluate` and `score` take it as --checkpoint; averaged.json
records which checkpoints went into it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_mt import rundir, sharding
from transformer_mt.checkpoint import Checkpoints, complete_steps, first_difference
from transformer_mt.config import ConfigError


def select_last(run_dir: Path, n: int | None) -> list[tuple[Path, int]]:
    """The n newest checkpoints in RUN/checkpoints (all of them when n is None), oldest first."""
    directory = rundir.checkpoints_dir(run_dir)
    steps = complete_steps(directory)
    if not steps:
        raise ConfigError(f"no checkpoint in {directory}")
    if n is not None and n > len(steps):
        raise ConfigError(f"--last {n}: {directory} holds {len(steps)} checkpoint(s) (steps {steps}); "
                          "train.keep_checkpoints sets how many training keeps")
    return [(directory, s) for s in steps[-(n or len(steps)):]]


def select_best(run_dir: Path, n: int) -> list[tuple[Path, int]]:
    """The n checkpoints on disk with the highest validation BLEU (from the checkpoints' history)."""
    on_disk = {s: rundir.best_dir(run_dir) for s in complete_steps(rundir.best_dir(run_dir))}
    on_disk.update({s: rundir.checkpoints_dir(run_dir) for s in complete_steps(rundir.checkpoints_dir(run_dir))})
    if not on_disk:
        raise ConfigError(f"no checkpoint in {run_dir}")
    newest = max(on_disk)
    history = Checkpoints(on_disk[newest], create=False).read_meta(newest).get("progress", {}).get("history", [])
    scored = sorted(((bleu, step) for step, bleu in history if step in on_disk), reverse=True)
    if len(scored) < n:
        raise ConfigError(f"--best {n}: only {len(scored)} checkpoint(s) of {run_dir} have a validation BLEU "
                          f"(steps {sorted(s for _, s in scored)}); checkpoints are scored when train.bleu_every "
                          "divides their step, and train.keep_checkpoints sets how many are kept")
    return sorted((on_disk[step], step) for _, step in scored[:n])


def check_same_shapes(sources: list[tuple[Path, int]]) -> None:
    """One line naming the first array whose shape differs between two of the checkpoints."""
    first_dir, first_step = sources[0]
    first = Checkpoints(first_dir, create=False).array_metadata(first_step)["params"]
    for directory, step in sources[1:]:
        other = Checkpoints(directory, create=False).array_metadata(step)["params"]
        difference = first_difference(first, other, (f"{first_dir}/{first_step}", f"{directory}/{step}"))
        if difference:
            raise ConfigError(f"cannot average checkpoints of different models: {difference}")


def average_params(trees: list[Any]) -> Any:
    """Element-wise mean, summed in float64 and cast back: identical inputs come back bit for bit."""
    total = jax.tree.map(lambda x: np.asarray(x, np.float64), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), total, tree)
    return jax.tree.map(lambda t, x: (t / len(trees)).astype(np.asarray(x).dtype), total, trees[0])


def average_run(run_dir: str | Path, out_dir: str | Path, sources: list[tuple[Path, int]]) -> Path:
    """Writes OUT_DIR: the run's config and tokenizer, one checkpoint of the averaged params (with
    the newest source's optimizer state, step and JSON record), and averaged.json."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("the output run must not be the source run (give -o OUT_RUN)")
    if complete_steps(rundir.checkpoints_dir(out_dir)):
        raise ConfigError(f"{out_dir} already holds checkpoints: choose a new -o OUT_RUN")
    check_same_shapes(sources)
    run = rundir.Run(run_dir)
    newest_step = max(step for _, step in sources)
    params, newest = [], None
    for directory, step in sources:  # a mismatch with config.yaml is one line (CheckpointMismatch)
        # Only the newest source's optimizer state goes into the output: the others' params only.
        restored = run.restore(directory, step, params_only=step != newest_step)
        params.append(jax.device_get(restored.state["params"]))
        if step == newest_step and newest is None:
            newest = restored
    state = {**newest.state, "params": average_params(params)}
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / rundir.CONFIG_FILE, out_dir / rundir.CONFIG_FILE)
    rundir.copy_tokenizer(run_dir, out_dir)
    record = {"source_run": str(run_dir.resolve()), "steps": [s for _, s in sources],
              "checkpoints": [str((d / str(s)).resolve()) for d, s in sources]}
    tmp = out_dir / (rundir.AVERAGED_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out_dir / rundir.AVERAGED_FILE)
    checkpoints = Checkpoints(rundir.checkpoints_dir(out_dir), keep=1)
    checkpoints.save(newest.step, sharding.put_state(run.mesh, state), {**newest.meta, "averaged_from": record})
    checkpoints.close()
    return out_dir


def average_command(args) -> int:
    run_dir = Path(args.checkpoint)
    rundir.load_config(run_dir)  # "not a run directory" before anything else
    if args.best is not None:
        sources, what = select_best(run_dir, args.best), f"best{args.best}"
    else:
        sources = select_last(run_dir, args.last)
        what = f"last{len(sources)}"
    out = Path(args.output) if args.output else run_dir.resolve().with_name(f"{run_dir.resolve().name}-avg-{what}")
    average_run(run_dir, out, sources)
    steps = ", ".join(str(s) for _, s in sources)
    print(f"averaged {len(sources)} checkpoint(s) (steps {steps}) into {out}", file=sys.stderr)
    return 0
