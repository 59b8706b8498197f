"""Faults: SIGKILL and SIGTERM at random moments, damaged checkpoints, a full disk, a wrong
tokenizer, unreadable input and unwritable output, non-finite losses.

Each fault must end in the same parameters as no fault at all, or in one line on stderr with a
non-zero exit code and every earlier checkpoint intact.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAST, ROOT, TINY, cli, cli_here, tiny_config
from transformer_mt import tokenizer as tok_lib
from transformer_mt.checkpoint import Checkpoints, write_reason
from transformer_mt.trainer import HOLD_ENV, train

sys.path.insert(0, str(ROOT / "benchmarks"))
import kill_resume as kr  # noqa: E402

STEPS = 30
# Log records every 2 steps, checkpoints every 5: most restarts fall between two records.
KILLED = ["train.max_steps=30", "train.checkpoint_every=5", "train.log_every=2"]


def same_state(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def one_error_line(stderr: bytes, fragment: str) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    assert lines and "Traceback" not in stderr.decode(errors="replace"), stderr.decode(errors="replace")[-3000:]
    assert fragment in lines[-1] and "error" in lines[-1], lines[-3:]
    return lines[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """30 steps, a checkpoint every 5, no fault: the reference every faulty run must end at."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(*KILLED), workdir, progress_bar=False)
    return workdir


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_random_moments_then_resumed_ends_bit_equal(uninterrupted, tmp_path, seed):
    # Three kills per seed, rotating over startup / training / mid-save SIGKILL and SIGTERM
    # (preemption: must save the step it reached and exit 143), then a resume to the end. Each
    # moment is a step still to come, and the run is held before its last step until the kill
    # arrives (trainer.HOLD_ENV), so every planned kill happens however fast training is.
    assert kr.HOLD_ENV == HOLD_ENV
    moments = [kr.MOMENTS[(seed + i) % len(kr.MOMENTS)] for i in range(3)]
    run = tmp_path / "run"
    kills = kr.kill_resume_loop(str(TINY), run, FAST + KILLED, moments, seed)
    assert [k.split(":")[0] for k in kills] == moments, kills
    params_equal, losses_equal = kr.same_run(uninterrupted, run, STEPS)
    assert params_equal, kills
    assert losses_equal, kills
    assert not any("tmp" in p.name for p in (run / "checkpoints").iterdir())


def test_damaged_checkpoint_is_skipped_and_moved_aside(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=6", "train.checkpoint_every=3"), run, progress_bar=False)
    assert Checkpoints(run / "checkpoints").steps() == [3, 6]
    good = Checkpoints(run / "checkpoints").read_state(6)
    # What a save killed mid-write leaves: a temporary directory of a newer step. Never listed.
    shutil.copytree(run / "checkpoints" / "6", run / "checkpoints" / "9.orbax-checkpoint-tmp-1234")
    # Step 6 damaged after its commit (disk error, interrupted copy): every array data file of its
    # state cut to its first bytes. (Cut in half, a file could keep every parameter in its first
    # half, since the writes' order varies: translate reads only the parameters, and CI once
    # restored step 6 whole.)
    for file in (p for p in (run / "checkpoints" / "6" / "state").glob("ocdbt.process_*/d/*") if p.is_file()):
        file.write_bytes(file.read_bytes()[:16])
    capsys.readouterr()

    # translate (the real entry point) falls back with one warning and leaves the run as it is
    r = cli("translate", "--checkpoint", str(run), "--no-progress", input=b"A dog .\n")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 0 and r.stdout.count(b"\n") == 1
    assert len(err) == 2 and "checkpoints/6" in err[0] and "cannot be restored" in err[0], err[:5]
    assert err[1].startswith("translated 1 line(s) with checkpoint step 3 on ")
    assert (run / "checkpoints" / "6").is_dir()

    train(None, run, resume=True, progress_bar=False)  # resume: 6 moved aside, 3 -> 6 redone
    err = capsys.readouterr().err
    assert "moved to" in err and "trying the previous one" in err
    assert [p.name.split("-")[0] for p in (run / "checkpoints.damaged").iterdir()] == ["6"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]  # tmp cleaned up
    assert same_state(Checkpoints(run / "checkpoints").read_state(6), good)


def test_full_disk_keeps_earlier_checkpoints(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = Checkpoints(run / "checkpoints").read_state(STEPS)
    # The kernel's file size limit makes every write past 50 kB fail with EFBIG, as a full disk
    # fails with ENOSPC: config and logs still fit, the checkpoint's arrays (~0.5 MB) do not.
    # keep_checkpoints=1: the failed save of step 35 must not have rotated step 30 out.
    cmd = kr.train_command(str(TINY), run, FAST + KILLED + [f"train.max_steps={STEPS + 10}",
                                                            "train.keep_checkpoints=1"], resume=True)
    limit_then_exec = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
                       "os.execv(sys.argv[1], sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", limit_then_exec, *cmd], cwd=ROOT, capture_output=True, timeout=600)
    assert r.returncode == 2
    line = one_error_line(r.stderr, f"newest complete checkpoint: step {STEPS}")
    assert "cannot write checkpoint 35" in line and "File too large" in line
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr.decode()[-3000:]
    checkpoints = Checkpoints(run / "checkpoints")
    assert checkpoints.steps() == [25, 30]
    assert same_state(checkpoints.read_state(STEPS), before)


LONG = "/tmp/pytest-of-root/pytest-63/test_full_disk_keeps_earlier_c0/run/checkpoints/35.orbax-checkpoint-tmp"
TS_MESSAGE = (f'OUT_OF_RANGE: Error writing "opt_state.1.0.count/0" in OCDBT database at local file "{LONG}/state/ocdbt.process_0/": '
              f'Failed writing: "{LONG}/state/ocdbt.process_0/d/b826": Failed to write 128200 bytes to file 18: ')


@pytest.mark.parametrize("error, reason", [
    (ValueError(TS_MESSAGE + "File too large [os_error_code='27']"), "File too large (errno 27)"),
    (ValueError(TS_MESSAGE + "File too large [os_error_code=27]"), "File too large (errno 27)"),
    (ValueError(TS_MESSAGE + "File too large [os_error_code=27, source='file.cc:12']"), "File too large (errno 27)"),
    # orbax re-raises a background save's failure wrapped, or as an exception group
    (RuntimeError("async save failed").with_traceback(None), "async save failed"),
    (ExceptionGroup("save failed", [ValueError(TS_MESSAGE + "No space left on device")]), "No space left on device (errno 28)"),
    (OSError(28, "No space left on device"), "No space left on device (errno 28)"),
    # no errno anywhere: the innermost cause (the end of the line) survives, not the start of a path
    (ValueError(TS_MESSAGE + "disk on fire"), "... "),
])
def test_write_reason_finds_the_os_error_in_any_wrapping(error, reason):
    assert write_reason(error).startswith(reason)
    assert len(write_reason(error)) <= 300


def test_write_reason_reads_chained_causes():
    try:
        try:
            raise ValueError(TS_MESSAGE + "File too large [os_error_code='27']")
        except ValueError as inner:
            raise RuntimeError("Checkpoint save failed") from inner
    except RuntimeError as outer:
        assert write_reason(outer) == "File too large (errno 27)"
    assert write_reason(ValueError(TS_MESSAGE + "disk on fire")).endswith("disk on fire")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    checkpoints = Checkpoints(run / "checkpoints")
    state = checkpoints.read_state(STEPS)
    meta = checkpoints.read_meta(STEPS)
    checkpoints.manager.delete(STEPS)
    # A NaN in one weight makes every loss from here on NaN (a diverged run in miniature).
    first = jax.tree_util.tree_flatten_with_path(state["params"])[0][0][0]
    state["params"] = jax.tree_util.tree_map_with_path(
        lambda path, x: np.full_like(x, np.nan) if path == first else x, state["params"])
    checkpoints.save(STEPS, state, meta)
    checkpoints.close()
    r = cli_here("train", "--workdir", str(run), "--resume", "--no-progress", "--set", "train.on_nonfinite=stop",
                 "--set", "train.log_every=1",
                 "--set", f"train.max_steps={STEPS + 10}")
    assert r.returncode == 1
    line = r.stderr.decode().strip().splitlines()[-1]
    assert f"non-finite loss or gradient at or before step {STEPS + 1}" in line and f"step {STEPS}" in line, line
    assert Checkpoints(run / "checkpoints").steps() == [25, 30]


def test_tokenizer_that_does_not_match_the_model(copied_run, tmp_path):
    cfg = tiny_config("tokenizer.vocab_size=200")
    sentences = gzip.decompress((ROOT / "data" / "multi30k" / "val.en.gz").read_bytes()).decode().splitlines()
    other = tok_lib.train(cfg.tokenizer, sentences, sentences, tmp_path / "other")
    assert other.src_vocab_size == 200
    shutil.copy(tmp_path / "other" / tok_lib.JOINT_FILE, copied_run / tok_lib.JOINT_FILE)
    r = cli_here("translate", "--checkpoint", str(copied_run), input=b"A dog .\n")
    assert r.returncode == 2
    line = one_error_line(r.stderr, "does not match the model")
    assert "(200," in line and "tokenizer" in line


def test_run_directory_without_checkpoint(copied_run):
    shutil.rmtree(copied_run / "checkpoints")
    shutil.rmtree(copied_run / "best")
    r = cli_here("translate", "--checkpoint", str(copied_run), input=b"A dog .\n")
    assert r.returncode == 2
    one_error_line(r.stderr, f"no checkpoint in {copied_run}")


def test_unreadable_input_and_unwritable_output(trained_run, tmp_path):
    r = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(tmp_path))
    assert r.returncode == 2
    one_error_line(r.stderr, "input is a directory")

    src = tmp_path / "src.en"
    src.write_text("A dog .\n")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.access(readonly, os.W_OK):  # root ignores file modes; sysfs refuses new files even to root
        readonly = Path("/sys")
    r = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(src), "-o", str(readonly / "out.de"))
    assert r.returncode == 2
    one_error_line(r.stderr, f"cannot write output {readonly / 'out.de'}")
    assert not any(p.name.startswith(".out.de") for p in readonly.iterdir())


def test_checkpoints_hold_arrays_and_json_only(uninterrupted):
    magic = {b"{": "JSON", b"Checkpoint": "commit marker", b"\x0c\xdb": "OCDBT", b"\x28\xb5\x2f\xfd": "zstd"}
    files = [p for p in (uninterrupted / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        head = path.read_bytes()[:16]
        kind = next((k for m, k in magic.items() if head.startswith(m)), None)
        assert kind is not None, f"{path}: unexpected file starting {head!r}"
        if kind == "JSON":
            json.loads(path.read_text(encoding="utf-8"))


def test_config_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "executed"
    evil.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    r = cli_here("train", "--config", str(evil), "--workdir", str(tmp_path / "run"))
    assert r.returncode == 2 and not marker.exists()
    one_error_line(r.stderr, "could not determine a constructor for the tag")


def test_preemption_saves_before_anything_else(tmp_path):
    # SIGTERM in this process once step 3 is logged: the run saves the step it reached at once,
    # without the final validation that an ordinary end runs (a grace period is short).
    run = tmp_path / "run"

    def preempt_after_step_3():
        while kr.logged_step(run, 0) < 3:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt_after_step_3, daemon=True).start()
    result = train(tiny_config("train.max_steps=1000", "train.log_every=1", "train.eval_every=7"), run,
                   progress_bar=False)
    assert result["stop_reason"] == "signal SIGTERM" and 3 <= result["step"] < 7
    assert Checkpoints(run / "checkpoints").steps() == [result["step"]]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("split") == "valid" for r in records)
