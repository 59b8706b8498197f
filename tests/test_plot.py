"""`plot`: training curves from metrics.jsonl (the shared trained run, and a killed run's log)."""

import json
import sys

from conftest import cli_here

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_a_real_run(trained_run, tmp_path):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["time"], float) for r in records)  # wall time, for the second row of plots
    out = tmp_path / "curves.png"
    r = cli_here("plot", str(trained_run), "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


def test_plot_a_killed_run_beside_a_real_one(trained_run, tmp_path):
    """A killed run's log ends in half a line, and older logs have no wall time: both still plot."""
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()[:20]
    lines = [json.dumps({k: v for k, v in json.loads(line).items() if k != "time"}) for line in lines]
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    out = tmp_path / "both.png"
    r = cli_here("plot", str(trained_run), str(killed), "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "skipped 1 unreadable line(s) (line 21)" in err and "Traceback" not in err, err
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


def test_plot_errors_are_one_line(trained_run, tmp_path, monkeypatch):
    cases = [
        ([str(tmp_path)], "no metrics.jsonl"),
        ([str(trained_run), "-o", str(tmp_path / "curves.xyz")], "unknown image format"),
    ]
    for args, fragment in cases:
        r = cli_here("plot", *args)
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and fragment in err, err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    r = cli_here("plot", str(trained_run), "-o", str(tmp_path / "c.png"))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "transformer_mt[plot]" in err, err
