"""What a training run tells the user: metrics.jsonl + TensorBoard, and a progress bar whose ETA
is the time left.

tqdm's own ETA divides the steps left by a rate that counts the first step's compile and every
validation as step time (6:24:04 at step 1 of a 35-minute run, jumping after each validation).
Here the rate is measured over training steps only, after the first, and the ETA adds the
validations still to come at the duration the last one took; validation shows as its own phase.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transformer_mt.rundir import METRICS_FILE


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.file = open(workdir / METRICS_FILE, "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the killed run's points from this step on.
            self.tb = SummaryWriter(str(workdir / "tb"), purge_step=purge_step)

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        # Wall-clock time (Unix seconds) in the file only: TensorBoard keeps its own.
        self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records up to `step` (and drops a half-written last line); rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def summarise(pending: list[dict], step: int, seconds: float, lr: float, data_wait: float) -> dict:
    """Token-weighted means of the steps since the last record; data_wait: share of the time
    the loop waited for a batch."""
    tokens = sum(float(m["tokens"]) for m in pending)
    finite = [m for m in pending if bool(m["finite"])]

    def mean(key):
        if not finite:
            return float("nan")
        return float(np.average([float(m[key]) for m in finite], weights=[float(m["tokens"]) for m in finite]))

    return {
        "step": step, "loss": mean("loss"), "nll": mean("nll"), "accuracy": mean("accuracy"),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in finite])) if finite else float("nan"),
        "lr": lr, "tokens_per_sec": tokens / max(seconds, 1e-9),
        "data_wait": data_wait / max(seconds, 1e-9),
        "nonfinite_steps": len(pending) - len(finite),
    }


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """Steps done of max_steps, with an ETA of training steps plus the validations still to come."""

    def __init__(self, start: int, total: int, validate_every: tuple[int, ...], enabled: bool):
        self.total, self.validate_every = total, [v for v in validate_every if v]
        self.bar = tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, desc="train",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.step_seconds = None  # smoothed time of one training step, first (compiling) step excluded
        self.validation_seconds: dict[int, float] = {}
        self.last = None
        self.fields = ""

    def step(self, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            dt = now - self.last
            self.step_seconds = dt if self.step_seconds is None else 0.95 * self.step_seconds + 0.05 * dt
        self.last = now
        self.bar.update(1)
        if step % 10 == 0:
            self._refresh(step)

    def _refresh(self, step: int) -> None:
        eta = ""
        if self.step_seconds is not None:
            left = (self.total - step) * self.step_seconds
            for every, seconds in self.validation_seconds.items():
                left += (self.total // every - step // every) * seconds
            eta = f"<{_clock(left)} left"
        self.bar.set_postfix_str(f"{eta}{', ' if eta and self.fields else ''}{self.fields}", refresh=True)

    def show(self, **fields) -> None:
        self.fields = ", ".join(f"{k}={v}" for k, v in fields.items())

    def validating(self, every: int):
        """Context for one validation: shown as its own phase, timed apart from the steps."""
        bar = self

        class Phase:
            def __enter__(self):
                self.start = time.perf_counter()
                bar.bar.set_description("validate")
                return self

            def __exit__(self, *exc):
                bar.validation_seconds[every] = time.perf_counter() - self.start
                bar.bar.set_description("train")
                bar.last = None  # the next step's interval would include this validation
                return False

        return Phase()

    def write(self, message: str) -> None:
        tqdm.write(message)

    def close(self) -> None:
        self.bar.close()
