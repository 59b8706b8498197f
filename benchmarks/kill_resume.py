"""Kills a training run with SIGKILL at random moments, resumes it each time with the same
command plus --resume, and checks that it ends exactly where an uninterrupted run ends:
parameters bit for bit and the same logged losses.

    python benchmarks/kill_resume.py --config configs/tiny.yaml --kills 5 --seed 0

Moments: "startup" (a random time after launch, before the first step), "training" (a random
logged step still to come, plus a random delay), "saving" (while orbax is writing a checkpoint
still to come: the run is frozen with SIGSTOP, the temporary directory checked, then killed), and
"preempt": SIGTERM instead of SIGKILL at a random step; the run must then save a checkpoint of the
step it reached and exit with 143. Every planned moment comes, however fast training is: a run
to be killed is held before its last step (before its first, for "startup") by the trainer's test
hook (trainer.HOLD_ENV) until the signal arrives. tests/test_faults.py runs the same loop on a
smaller configuration.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOMENTS = ("startup", "training", "saving", "preempt")
EXIT_SIGTERM = 128 + signal.SIGTERM
HOLD_ENV = "TRANSFORMER_MT_TEST_HOLD_AT_STEP"  # transformer_mt.trainer.HOLD_ENV (not imported: no jax here)
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def train_command(config: str, workdir: Path, overrides: list[str], resume: bool) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "transformer_mt.cli", "train", "--config", config, *sets,
            "--workdir", str(workdir), "--no-progress"] + (["--resume"] if resume else [])


@dataclass(frozen=True)
class Schedule:
    """When a run logs and saves: kill moments are chosen among the steps still to come."""

    max_steps: int
    log_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, config: str, overrides: list[str]) -> "Schedule":
        sys.path.insert(0, str(ROOT))
        from transformer_mt import config as config_lib

        t = config_lib.load(config, overrides).train
        return cls(t.max_steps, t.log_every, t.checkpoint_every)

    def logged(self, after: int, until: int) -> list[int]:
        return [s for s in range(after + 1, until + 1) if self.log_every and s % self.log_every == 0]

    def saved(self, after: int, until: int) -> list[int]:
        return [s for s in range(after + 1, until + 1) if self.checkpoint_every and s % self.checkpoint_every == 0]


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


def choose_target(moment: str, schedule: Schedule, start: int, later: list[str], rng: random.Random) -> int:
    """The step a kill waits for: a random logged (or, for "saving", saved) step after `start`
    and before the run's hold, early enough that the kills still planned after it find steps too."""
    last = schedule.max_steps - 1
    steps = schedule.saved(start, last) if moment == "saving" else schedule.logged(start, last)
    if not steps:
        raise RuntimeError(f"no {'checkpoint' if moment == 'saving' else 'logged'} step between {start} and "
                           f"{last} for a '{moment}' kill: give the run more steps or plan fewer kills")
    # A "saving" kill still to come needs a save after wherever this kill leaves the run.
    bound = max(schedule.saved(start, last), default=last + 1) - 1 if "saving" in later else last
    early = [s for s in steps if s <= start + max(bound - start, 0) // (len(later) + 1)]
    return rng.choice(early or steps[:1])


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP, and returns only once every thread has stopped (a rename already under way when
    the signal is sent finishes first; waitpid reports the stop when the whole process is still)."""
    proc.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise RuntimeError(f"the run ended (exit {proc.returncode}) while it was being frozen mid-save")


def run_once(cmd: list[str], workdir: Path, moment: str | None, rng: random.Random, schedule: Schedule,
             later: list[str] = (), timeout: float = 600.0) -> str | None:
    """Runs `cmd` and, unless `moment` is None, kills it at that moment; returns "moment: where"
    (None: it ran to the end; a failure raises RuntimeError with the run's stderr).

    A run to be killed is held before its last step (its first, for "startup"), so the moment
    always comes before the run could finish. `later`: the moments planned after this one."""
    start = max(checkpoint_steps(workdir), default=0)
    env = dict(os.environ)
    if moment is not None:
        env[HOLD_ENV] = str(start if moment == "startup" else schedule.max_steps - 1)
    target = None if moment in (None, "startup") else choose_target(moment, schedule, start, list(later), rng)
    delay, jitter = rng.uniform(0.3, 3.0), rng.uniform(0.0, 0.2)
    stale = saving_dirs(workdir)  # a killed save's leftovers: removed by the run's checkpoint manager
    armed = not stale
    reached = None
    launched = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)

        def stderr() -> str:
            err.seek(0)
            return err.read().decode(errors="replace")[-3000:]

        try:
            while proc.poll() is None:
                now = time.time()
                if now - launched > timeout:
                    raise RuntimeError(f"{' '.join(cmd)} still running after {timeout:.0f} s "
                                       f"(waiting for '{moment}' at step {target}):\n{stderr()}")
                step = logged_step(workdir, launched)
                if moment == "startup" and now - launched >= delay:
                    where = f"startup: {now - launched:.1f} s after launch"
                elif moment == "training" and step >= target:
                    reached = reached or now
                    if now - reached < jitter:
                        time.sleep(0.002)
                        continue
                    where = f"training: after logged step {logged_step(workdir, launched)}"
                elif moment == "saving":
                    dirs = saving_dirs(workdir)
                    armed = armed or not dirs & stale or step > start
                    if not (armed and f"{target}{TMP_SUFFIX}" in dirs):
                        time.sleep(0.002)
                        continue
                    freeze(proc)  # the save cannot commit while we look
                    if f"{target}{TMP_SUFFIX}" not in saving_dirs(workdir):
                        proc.send_signal(signal.SIGCONT)  # it committed just before: take the next save
                        target = choose_target(moment, schedule, target, list(later), rng)
                        continue
                    where = f"saving: checkpoint {target} killed mid-write"
                elif moment == "preempt" and step >= target:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        code = proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        raise RuntimeError(f"the run did not exit within {timeout:.0f} s of SIGTERM") from None
                    saved = max(checkpoint_steps(workdir), default=0)
                    if code != EXIT_SIGTERM or f"checkpoint saved at step {saved};" not in stderr():
                        raise RuntimeError(f"after SIGTERM: exit code {code}, newest checkpoint {saved}:\n{stderr()}")
                    return f"preempt: SIGTERM after logged step {step}, checkpoint {saved} saved, exit code {code}"
                else:
                    time.sleep(0.002)
                    continue
                proc.kill()
                proc.wait()
                return where
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"training exited with {proc.returncode}:\n{stderr()}")
        if moment is not None:
            raise RuntimeError(f"the run finished before its '{moment}' moment although it was held:\n{stderr()}")
        return None


def kill_resume_loop(config: str, workdir: Path, overrides: list[str], moments: list[str], seed: int) -> list[str]:
    """Launches, kills at each of `moments` in turn, then resumes to the end; returns the kills,
    one per moment, each "moment: where"."""
    schedule = Schedule.of(config, overrides)
    rng = random.Random(seed)
    kills = []
    for k, moment in enumerate(moments):
        cmd = train_command(config, workdir, overrides, k > 0)
        kills.append(run_once(cmd, workdir, moment, rng, schedule, later=moments[k + 1:]))
    run_once(train_command(config, workdir, overrides, True), workdir, None, rng, schedule)
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
    schedule = Schedule.of(args.config, args.overrides)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    # Every restart would otherwise compile the training step again; the runs share a cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    for name in ("uninterrupted", "killed"):
        shutil.rmtree(root / name, ignore_errors=True)
    t0 = time.time()
    assert run_once(train_command(args.config, root / "uninterrupted", args.overrides, False), root / "uninterrupted",
                    None, random.Random(0), schedule) is None
    t1 = time.time()
    rng = random.Random(args.seed)
    moments = [rng.choice(MOMENTS) for _ in range(args.kills)]
    kills = kill_resume_loop(args.config, root / "killed", args.overrides, moments, args.seed)
    t2 = time.time()
    for k, where in enumerate(kills, 1):
        print(f"kill {k}: {where}")
    params_equal, losses_equal = same_run(root / "uninterrupted", root / "killed", schedule.max_steps)
    print(f"uninterrupted run {t1 - t0:.0f} s; killed {len(kills)} times and resumed in {t2 - t1:.0f} s")
    print(f"final parameters and optimizer state bit-equal: {params_equal}; logged losses equal: {losses_equal}")
    return 0 if params_equal and losses_equal else 1


if __name__ == "__main__":
    sys.exit(main())
