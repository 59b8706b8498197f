"""`plot`: the training curves of one or more runs, from their metrics.jsonl, in one figure.

Loss (training solid, validation dashed) and validation BLEU against steps and, where the
records carry wall-clock time, against hours since each run's first record. matplotlib is an
optional extra (`pip install 'transformer_mt[plot]'`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from transformer_mt import rundir
from transformer_mt.config import ConfigError
from transformer_mt.textio import warn

EXTRA_HINT = "pip install 'transformer_mt[plot]'"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl; unreadable lines (a killed run's unfinished last line)
    are skipped with one warning."""
    path = rundir.metrics_path(run_dir)
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {rundir.METRICS_FILE} (plot takes run directories written by train)")
    records, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad.append(n)
    if bad:
        warn(f"{path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
             f"{', ...' if len(bad) > 5 else ''}); a killed run leaves its last line unfinished")
    return records


def curves(records: list[dict]) -> dict[str, list[tuple[float, float, float | None]]]:
    """{train_loss, valid_loss, valid_bleu}: (step, value, wall time or None) points in step order."""

    def points(keep, key):
        out = [(r["step"], r[key], r.get("time")) for r in records if keep(r) and isinstance(r.get(key), (int, float))]
        return sorted(out, key=lambda p: p[0])

    valid = lambda r: r.get("split") == "valid"  # noqa: E731
    return {"train_loss": points(lambda r: "split" not in r, "loss"),
            "valid_loss": points(valid, "loss"),
            "valid_bleu": points(valid, "bleu")}


def labels(runs: Sequence[str | Path]) -> list[str]:
    """Directory names, or whole paths where two runs share a name."""
    names = [Path(r).resolve().name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def plot_runs(runs: Sequence[str | Path], output: str | Path) -> Path:
    """Draws the curves of every run into one figure at `output` (format from its extension)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise ConfigError(f"plot needs matplotlib, an optional extra: {EXTRA_HINT}") from None
    data = [curves(read_metrics(run)) for run in runs]
    output = Path(output)
    fmt = output.suffix.lstrip(".").lower()
    fig = Figure()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"-o {output}: unknown image format '{fmt}' (use .png, .pdf or .svg)")
    # Wall time counts from each run's first record, in a unit that suits the longest run.
    starts = [min((p[2] for points in d.values() for p in points if p[2] is not None), default=None) for d in data]
    span = max((p[2] - start for d, start in zip(data, starts) for points in d.values() for p in points
                if p[2] is not None), default=None)
    unit, seconds = next((u, s) for u, s, above in (("hours", 3600, 7200), ("minutes", 60, 120), ("seconds", 1, -1))
                         if (span or 0) > above)
    x_axes = ["step"] + ([f"wall time ({unit} since the run's first record)"] if span is not None else [])
    fig.set_size_inches(11, 3.6 * len(x_axes))
    axes = fig.subplots(len(x_axes), 2, squeeze=False)
    for row, x_label in enumerate(x_axes):
        loss_ax, bleu_ax = axes[row]
        for k, (d, start) in enumerate(zip(data, starts)):
            colour = f"C{k % 10}"

            def xy(points):
                if row == 0:
                    return [p[0] for p in points], [p[1] for p in points]
                kept = [p for p in points if p[2] is not None]
                return [(p[2] - start) / seconds for p in kept], [p[1] for p in kept]

            loss_ax.plot(*xy(d["train_loss"]), color=colour, linewidth=1.2)
            loss_ax.plot(*xy(d["valid_loss"]), color=colour, linestyle="--", marker=".", linewidth=1.2)
            bleu_ax.plot(*xy(d["valid_bleu"]), color=colour, marker="o", markersize=3, linewidth=1.2)
        loss_ax.set(xlabel=x_label, ylabel="loss (label-smoothed)")
        bleu_ax.set(xlabel=x_label, ylabel="validation BLEU")
        for ax in (loss_ax, bleu_ax):
            ax.grid(alpha=0.3)
    run_handles = [Line2D([], [], color=f"C{k % 10}", label=label) for k, label in enumerate(labels(runs))]
    style_handles = [Line2D([], [], color="0.3", label="training"),
                     Line2D([], [], color="0.3", linestyle="--", marker=".", label="validation")]
    axes[0, 0].legend(handles=run_handles + style_handles, fontsize="small")
    if not any(d["valid_bleu"] for d in data):
        for ax in axes[:, 1]:
            ax.text(0.5, 0.5, "no validation BLEU recorded\n(train.bleu_every)", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
    fig.suptitle("training curves: " + ", ".join(labels(runs)), fontsize="medium")
    fig.tight_layout()
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt, dpi=110)
        tmp.replace(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {output}: {e.strerror or e}") from None
    return output


def plot_command(args) -> int:
    out = plot_runs(args.runs, args.output)
    print(f"plotted {len(args.runs)} run(s) into {out}", file=sys.stderr)
    return 0
