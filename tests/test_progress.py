"""The training progress bar's ETA is the time left: the first (compiling) step and validations
are not counted as step time, and the validations still to come are added at their own cost."""

from unittest import mock

from transformer_mt import train_log


def test_eta_ignores_compile_and_counts_validations_apart():
    clock = [0.0]
    with mock.patch.object(train_log.time, "perf_counter", lambda: clock[0]):
        bar = train_log.ProgressBar(0, 1000, (100, 0), enabled=False)
        for step in range(1, 201):
            clock[0] += 60.0 if step == 1 else 0.5  # the first step compiles for a minute
            bar.step(step)
            if step % 100 == 0:
                with bar.validating(100):
                    clock[0] += 30.0
        bar._refresh(200)
    # 800 steps at 0.5 s and 8 validations at 30 s: 640 s, whatever the first step and the last
    # validation cost.
    assert bar.bar.postfix.startswith("<10:40 left"), bar.bar.postfix
    assert bar.step_seconds == 0.5
