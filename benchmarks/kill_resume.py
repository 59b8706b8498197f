"""Kills a training run with SIGKILL at random moments, resumes it each time with the same
command plus --resume, and checks that it ends exactly where an uninterrupted run ends:
parameters bit for bit and the same logged losses.

    python benchmarks/kill_resume.py --config configs/tiny.yaml --kills 5 --seed 0

Moments: "startup" (a random time before training), "training" (a random logged step, plus a
random delay), "saving" (while orbax is writing a checkpoint), and "preempt": SIGTERM instead of
SIGKILL at a random step; the run must then save a checkpoint of the step it reached and exit
with 143. tests/test_faults.py runs
the same loop on a smaller configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOMENTS = ("startup", "training", "saving", "preempt")
EXIT_SIGTERM = 128 + signal.SIGTERM


def train_command(config: str, workdir: Path, overrides: list[str], resume: bool) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "transformer_mt.cli", "train", "--config", config, *sets,
            "--workdir", str(workdir), "--no-progress"] + (["--resume"] if resume else [])


def logged_step(workdir: Path, since: float) -> int:
    """The newest training step in metrics.jsonl if the file changed after `since`, else -1."""
    path = workdir / "metrics.jsonl"
    try:
        if path.stat().st_mtime < since:
            return -1
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return -1
    steps = [-1]
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass  # a line being written
    return max(steps)


def saving_dirs(workdir: Path) -> set[str]:
    """Orbax's temporary directories: they exist only while a checkpoint is being written."""
    try:
        return {p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name}
    except OSError:
        return set()


def checkpoint_steps(workdir: Path) -> list[int]:
    from transformer_mt.checkpoint import complete_steps

    return complete_steps(workdir / "checkpoints")


def run_once(cmd: list[str], workdir: Path, moment: str | None, rng: random.Random, max_steps: int,
             timeout: float = 600.0) -> str | None:
    """Runs `cmd`; SIGKILLs it at `moment` (None: never). Returns where it was killed, or None if
    it finished (a failure exits with the run's stderr)."""
    start_ckpt = max(checkpoint_steps(workdir), default=0)
    launched = time.time()
    stale = saving_dirs(workdir)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    delay = rng.uniform(0.3, 3.0)
    target = rng.randint(start_ckpt + 1, max(start_ckpt + 1, max_steps - 1))
    jitter = rng.uniform(0.0, 0.2)
    reached = None
    while proc.poll() is None:
        now = time.time()
        if now - launched > timeout:
            proc.kill()
            raise RuntimeError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s")
        if moment == "startup" and now - launched >= delay:
            where = f"startup, {now - launched:.1f} s after launch"
        elif moment == "training" and logged_step(workdir, launched) >= target:
            reached = reached or now
            if now - reached < jitter:
                time.sleep(0.002)
                continue
            where = f"training, after step {logged_step(workdir, launched)}"
        elif moment == "saving" and saving_dirs(workdir) - stale:
            where = f"saving {sorted(saving_dirs(workdir) - stale)[0]}"
        elif moment == "preempt" and logged_step(workdir, launched) >= target:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError("the run did not exit after SIGTERM") from None
            stderr = proc.stderr.read().decode(errors="replace")
            saved = max(checkpoint_steps(workdir), default=0)
            if code == 0 and saved >= max_steps:
                return None  # finished before the signal arrived
            if code != EXIT_SIGTERM or f"checkpoint saved at step {saved};" not in stderr:
                raise RuntimeError(f"after SIGTERM: exit code {code}, newest checkpoint {saved}:\n{stderr[-3000:]}")
            return f"SIGTERM after logged step {logged_step(workdir, launched)}: checkpoint {saved} saved, exit code {code}"
        else:
            time.sleep(0.002)
            continue
        proc.kill()
        proc.wait()
        return where
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode}:\n{stderr[-3000:]}")
    return None


def kill_resume_loop(config: str, workdir: Path, overrides: list[str], moments: list[str], seed: int,
                     max_steps: int) -> list[str]:
    """Launches, kills at each of `moments` in turn, then resumes to the end; returns the kills."""
    rng = random.Random(seed)
    kills = []
    for k, moment in enumerate(moments):
        where = run_once(train_command(config, workdir, overrides, k > 0), workdir, moment, rng, max_steps)
        if where is None:  # it finished before the moment came: nothing left to kill
            return kills
        kills.append(where)
    run_once(train_command(config, workdir, overrides, True), workdir, None, rng, max_steps)
    return kills


def final_state(workdir: Path, step: int):
    from transformer_mt.checkpoint import Checkpoints

    return Checkpoints(workdir / "checkpoints").read_state(step)


def training_losses(workdir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "split" not in r]


def same_run(a: Path, b: Path, step: int) -> tuple[bool, bool]:
    """(parameters and optimizer state bit-equal at `step`, identical logged training losses)."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(final_state(a, step)), jax.tree.leaves(final_state(b, step))
    params_equal = len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
    return params_equal, training_losses(a) == training_losses(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs before the final resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from transformer_mt import config as config_lib

    max_steps = config_lib.load(args.config, args.overrides).train.max_steps
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    # Every restart would otherwise compile the training step again; the runs share a cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    for name in ("uninterrupted", "killed"):
        shutil.rmtree(root / name, ignore_errors=True)
    t0 = time.time()
    assert run_once(train_command(args.config, root / "uninterrupted", args.overrides, False), root / "uninterrupted",
                    None, random.Random(0), max_steps) is None
    t1 = time.time()
    rng = random.Random(args.seed)
    moments = [rng.choice(MOMENTS) for _ in range(args.kills)]
    kills = kill_resume_loop(args.config, root / "killed", args.overrides, moments, args.seed, max_steps)
    t2 = time.time()
    for k, where in enumerate(kills, 1):
        print(f"kill {k}: {where}")
    params_equal, losses_equal = same_run(root / "uninterrupted", root / "killed", max_steps)
    print(f"uninterrupted run {t1 - t0:.0f} s; killed {len(kills)} times and resumed in {t2 - t1:.0f} s")
    print(f"final parameters and optimizer state bit-equal: {params_equal}; logged losses equal: {losses_equal}")
    return 0 if params_equal and losses_equal else 1


if __name__ == "__main__":
    sys.exit(main())
