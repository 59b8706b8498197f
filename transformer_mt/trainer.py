"""The training loop: set up (data, model, state, resume), step until done, save and report.

The step functions themselves are pure (train_step.py); here they are jit-compiled once per
process (see compiled_steps) with explicit shardings and donated state. Batches come from a
background thread (prefetch.py) over the token store (train_data.py).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_mt import config as config_lib
from transformer_mt import corpus
from transformer_mt import data as data_lib
from transformer_mt import rundir
from transformer_mt import sharding
from transformer_mt import train_data
from transformer_mt import train_step as ts
from transformer_mt.checkpoint import Checkpoints
from transformer_mt.config import Config, ConfigError
from transformer_mt.host_memory import StepTrimmer
from transformer_mt.model import count_params
from transformer_mt.prefetch import Prefetcher
from transformer_mt.rundir import CONFIG_FILE, METRICS_FILE, build_model
from transformer_mt.train_log import MetricsLog, ProgressBar, summarise, truncate_metrics

# Test hook (tests/test_faults.py, benchmarks/kill_resume.py): with this set to N, the run waits
# after step N (before N+1) until it is signalled. A test that plans to kill the run at some later
# moment holds it before its last step, so the run can never finish before that moment comes.
HOLD_ENV = "TRANSFORMER_MT_TEST_HOLD_AT_STEP"
_LAUNCHER = os.getppid()  # noted at import: a held run whose launcher is gone stops (StopSignal.wait)
PREFETCH_DEPTH = 4


class TrainingStopped(RuntimeError):
    """Training ended early for a reason the user must see (e.g. a non-finite loss)."""


class Interrupted(RuntimeError):
    """A signal stopped the launch before training began; nothing half-written was left."""

    def __init__(self, signal_name: str, phase: str):
        super().__init__(f"{signal_name} received while {phase}")
        self.signal_name = signal_name


@dataclass
class Progress:
    """Validation history kept in each checkpoint's JSON record."""

    best_bleu: float = -1.0
    best_step: int = -1
    bad_validations: int = 0
    history: list = field(default_factory=list)


class CompiledSteps(NamedTuple):
    micro: Callable  # (state, batch, micro_index) -> (summed grads, metric sums)
    apply: Callable  # (state, grads, metric sums) -> (state, metrics); donates state
    fused: Callable  # (state, batch) -> (state, metrics): micro + apply in one program
    add: Callable  # accumulates micro-batch results
    evaluate: Callable  # (params, batch) -> validation sums


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef, optimizer: ts.OptimizerSettings, smoothing: float, mesh, state_treedef,
                   state_shardings: tuple) -> CompiledSteps:
    """The jitted step functions, built once per (model, optimizer, mesh) for the whole process.

    Arguments are hashable so that later train() calls (a resume, the next test) reuse the
    traced and compiled programs instead of tracing and compiling them again.
    """
    tx = ts.make_optimizer(optimizer)
    state_sh = jax.tree.unflatten(state_treedef, state_shardings)
    repl = sharding.replicated(mesh)
    one_device = mesh.size == 1  # matmul.weight_grad's kernel transposes: not for sharded operands
    return CompiledSteps(
        micro=jax.jit(ts.bind(ts.micro_grads, graphdef=graphdef, smoothing=smoothing, kernel_transposes=one_device)),
        apply=jax.jit(ts.bind(ts.apply_grads, tx=tx), donate_argnums=0, out_shardings=(state_sh, repl)),
        fused=jax.jit(ts.bind(ts.train_step, graphdef=graphdef, tx=tx, smoothing=smoothing,
                              kernel_transposes=one_device),
                      donate_argnums=0, out_shardings=(state_sh, repl)),
        add=jax.jit(ts.accumulate, donate_argnums=0),
        evaluate=jax.jit(ts.bind(ts.eval_step, graphdef=graphdef, smoothing=smoothing)),
    )


class StopSignal:
    """Turns SIGTERM/SIGINT (preemption notice, Ctrl-C) into a flag, checked between steps and
    between the chunks of every phase before them (reading, tokenizing, planning)."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def wait(self) -> str:
        """Blocks until a signal arrives; returns its name (see HOLD_ENV). A run whose launcher is
        gone (a killed test) stops as if preempted instead of waiting forever."""
        while not self.received:
            if os.getppid() != _LAUNCHER or _LAUNCHER == 1:
                self.received = signal.SIGTERM.name
            time.sleep(0.01)
        return self.received


def prepare_workdir(workdir: Path, cfg: Config | None, resume: bool, overrides: list[str]) -> Config:
    """Resolves the run's config: the given one, else (on --resume) the run directory's own plus overrides."""
    saved = workdir / CONFIG_FILE
    has_checkpoints = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    if cfg is None and resume and saved.is_file():
        cfg = config_lib.load(saved, overrides)
    if has_checkpoints and not resume:
        raise ConfigError(f"{workdir} already holds checkpoints: pass --resume to continue, or choose a new --workdir")
    if cfg is None:
        raise ConfigError(f"no --config given and no {CONFIG_FILE} in {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        tmp = workdir / (CONFIG_FILE + ".tmp")
        config_lib.save_yaml(cfg, tmp)
        tmp.replace(saved)
    return cfg


@dataclass
class Run:
    """Everything a training run holds between steps: the one place its state lives."""

    cfg: Config
    workdir: Path
    mesh: Any
    data: train_data.RunData
    stream: data_lib.TrainStream
    graphdef: Any
    state: Any
    steps: CompiledSteps
    checkpoints: Checkpoints
    best: Checkpoints
    progress: Progress
    pending: list  # metrics of the steps since the last log record
    start_step: int
    batches: Prefetcher | None = None
    log: MetricsLog | None = None
    bar: ProgressBar | None = None
    translator: Any = None
    trimmer: StepTrimmer | None = None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def meta(self) -> dict:
        """The checkpoint's JSON record. Steps since the last log record travel with it, so that a
        run resumed between two records logs the same averages as a run never stopped."""
        unlogged = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.pending)]
        return {"data_position": self.batches.position, "progress": self.progress.__dict__,
                "config": config_lib.to_dict(self.cfg), "step": self.step, "unlogged_metrics": unlogged}

    def close(self) -> None:
        for part in (self.batches, self.checkpoints, self.best, self.log, self.bar, self.trimmer):
            if part is not None:
                part.close()


def train(cfg: Config | None, workdir: str | Path, resume: bool = False, overrides: list[str] | None = None,
          progress_bar: bool = True, init_from: str | None = None) -> dict:
    """Trains (or resumes) a run in `workdir`; returns the last logged metrics.

    init_from (RUN or RUN/STEP): a run without checkpoints starts from that checkpoint's
    parameters and tokenizer, with a fresh optimizer and step (fine-tuning).
    """
    sharding.maybe_initialize_distributed()
    workdir = Path(workdir)
    cfg = prepare_workdir(workdir, cfg, resume, overrides or [])
    with StopSignal() as stop:
        try:
            run = set_up(cfg, workdir, resume, init_from, progress_bar, stop)
        except corpus.Interrupted:
            raise Interrupted(stop.received or "SIGINT", "preparing the training data") from None
        try:
            last, stop_reason = loop(run, stop)
            return finish(run, last, stop_reason)
        finally:
            run.close()


def set_up(cfg: Config, workdir: Path, resume: bool, init_from: str | None, progress_bar: bool,
           stop: StopSignal) -> Run:
    """Data, model, optimizer state (restored on resume), compiled steps, logs."""
    mesh = sharding.make_mesh()
    should_stop = lambda: stop.received is not None  # noqa: E731
    data = train_data.prepare(cfg, workdir, init_from, resume, sharding.data_size(mesh), progress_bar, should_stop)
    if should_stop():
        raise corpus.Interrupted("stopped")
    stream = data_lib.TrainStream(data.train, cfg.data, cfg.train.seed, sharding.data_size(mesh),
                                  jax.process_index(), jax.process_count())
    model = build_model(cfg, data.tok.src_vocab_size, data.tok.tgt_vocab_size)
    graphdef, state = ts.init_state(model, ts.make_optimizer(cfg.train), cfg.train.seed)
    state = sharding.put_state(mesh, state)
    tcfg = cfg.train
    run = Run(cfg, workdir, mesh, data, stream, graphdef, state, None,
              Checkpoints(workdir / "checkpoints", keep=tcfg.keep_checkpoints), Checkpoints(workdir / "best", keep=1),
              Progress(), [], 0)
    restore(run, resume, init_from)
    leaves, treedef = jax.tree.flatten(sharding.state_sharding(mesh, run.state))
    run.steps = compiled_steps(graphdef, ts.OptimizerSettings.of(tcfg), tcfg.label_smoothing, mesh, treedef,
                               tuple(leaves))
    run.batches = Prefetcher(stream, PREFETCH_DEPTH, prepare=functools.partial(sharding.put_batch, mesh))
    run.trimmer = StepTrimmer()
    run.log = MetricsLog(workdir, run.is_main, purge_step=run.start_step + 1 if resume else None)
    if tcfg.bleu_every:
        from transformer_mt.search import Translator

        run.translator = Translator(cfg, graphdef, data.tok, mesh)
    if run.is_main:
        n_params = count_params(nnx.merge(graphdef, run.state["params"]))
        print(f"model: {n_params / 1e6:.2f}M parameters; vocab {data.tok.src_vocab_size}/{data.tok.tgt_vocab_size}; "
              f"{len(data.train):,} training pairs; {len(jax.devices())} device(s); from step {run.start_step}",
              flush=True)
    run.bar = ProgressBar(run.start_step, tcfg.max_steps, (tcfg.eval_every, tcfg.bleu_every),
                          progress_bar and run.is_main)
    return run


def restore(run: Run, resume: bool, init_from: str | None) -> None:
    """The newest checkpoint's state, data position and history (resume), or --init-from's parameters."""
    restored = run.checkpoints.restore_newest(run.state) if resume else None
    if restored is not None:
        run.state, meta, _ = restored
        run.stream.set_position(meta["data_position"])
        run.progress = Progress(**meta["progress"])
        run.pending = list(meta.get("unlogged_metrics", []))
    elif init_from:
        params, source = rundir.init_params(init_from, run.state["params"], run.mesh)
        run.state = {**run.state, "params": params}
        if run.is_main:
            print(f"parameters from {source}; optimizer and step fresh", flush=True)
    run.start_step = run.step
    if resume and run.is_main:
        # Whatever a killed run wrote after this checkpoint is redone, identically, from here.
        run.best.delete_after(run.start_step)
        truncate_metrics(run.workdir / METRICS_FILE, run.start_step)


def one_step(run: Run):
    """One optimizer step over train.grad_accum micro-batches."""
    steps, accum = run.steps, run.cfg.train.grad_accum
    if accum == 1:
        return steps.fused(run.state, next(run.batches))
    acc = None
    for i in range(accum):
        out = steps.micro(run.state, next(run.batches), jnp.int32(i))
        acc = out if acc is None else steps.add(acc, *out)
    return steps.apply(run.state, *acc)


def loop(run: Run, stop: StopSignal) -> tuple[dict, str | None]:
    """Steps until max_steps, a stop signal, early stopping, the time limit or a non-finite loss."""
    tcfg = run.cfg.train
    hold_at = int(os.environ.get(HOLD_ENV) or -1)
    last: dict[str, Any] = {}
    t_start = t_log = time.time()
    wait_at_log = run.batches.wait_seconds
    step, stop_reason = run.start_step, None
    while step < tcfg.max_steps and not stop_reason:
        if step == hold_at:
            return last, f"signal {stop.wait()}"
        run.state, metrics = one_step(run)
        run.trimmer.after(metrics)
        step += 1
        run.pending.append(metrics)
        run.bar.step(step)
        if tcfg.log_every and step % tcfg.log_every == 0 or step == tcfg.max_steps:
            lr = float(ts.inverse_sqrt_schedule(tcfg.learning_rate, tcfg.warmup_steps)(step - 1))
            last = summarise(jax.device_get(run.pending), step, time.time() - t_log, lr,
                             run.batches.wait_seconds - wait_at_log)
            run.pending, t_log, wait_at_log = [], time.time(), run.batches.wait_seconds
            run.log.write(last)
            run.bar.show(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
            if last["nonfinite_steps"] and tcfg.on_nonfinite == "stop":
                return last, "nonfinite"
            if last["nonfinite_steps"]:
                run.bar.write(f"warning: skipped {last['nonfinite_steps']} step(s) with a non-finite loss or "
                              f"gradient before step {step}")
        stop_reason = validate_and_save(run, step)
        if tcfg.time_limit_minutes and time.time() - t_start > 60 * tcfg.time_limit_minutes:
            stop_reason = stop_reason or "time limit"
        if stop.received and step < tcfg.max_steps:  # at the last step the run is simply done
            stop_reason = f"signal {stop.received}"
    return last, stop_reason


def validate_and_save(run: Run, step: int) -> str | None:
    """Whatever is due at this step: validation loss, validation BLEU (saving a new best), a checkpoint."""
    tcfg, stop_reason = run.cfg.train, None
    if tcfg.eval_every and step % tcfg.eval_every == 0 and run.data.valid_batches:
        with run.bar.validating(tcfg.eval_every):
            validate_loss(run, step)
    if run.translator is not None and step % tcfg.bleu_every == 0:
        with run.bar.validating(tcfg.bleu_every):
            stop_reason = validate_bleu(run, step)
    if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
        run.checkpoints.save(step, run.state, run.meta())
    return stop_reason


def validate_loss(run: Run, step: int) -> None:
    totals = None
    for batch in run.data.valid_batches:
        out = run.steps.evaluate(run.state["params"], sharding.put_batch(run.mesh, batch))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    tokens = max(float(totals["tokens"]), 1.0)
    nll = float(totals["nll_sum"]) / tokens
    record = {"step": step, "split": "valid", "loss": float(totals["loss_sum"]) / tokens, "nll": nll,
              "ppl": float(np.exp(min(nll, 50.0))), "accuracy": float(totals["correct"]) / tokens}
    run.log.write(record, "valid")
    run.bar.write(f"step {step}: valid loss {record['loss']:.4f} nll {record['nll']:.4f} acc {record['accuracy']:.3f}")


def validate_bleu(run: Run, step: int) -> str | None:
    """Validation BLEU; saves a new best; returns "early stopping" when patience runs out."""
    from transformer_mt.metrics import corpus_scores

    cfg, progress = run.cfg, run.progress
    n = cfg.train.bleu_subset or len(run.data.valid_src)
    hyps = run.translator.translate(run.state["params"], run.data.valid_src[:n], beam_size=cfg.decode.beam_size,
                                    alpha=cfg.decode.alpha)
    scores = corpus_scores(hyps, run.data.valid_tgt[:n])
    run.log.write({"step": step, "split": "valid", "bleu": scores["bleu"], "chrf": scores["chrf"]}, "valid")
    improved = scores["bleu"] > progress.best_bleu
    progress.history.append([step, scores["bleu"]])
    if improved:
        progress.best_bleu, progress.best_step, progress.bad_validations = scores["bleu"], step, 0
        run.best.save(step, run.state, run.meta())
    else:
        progress.bad_validations += 1
    run.bar.write(f"step {step}: valid BLEU {scores['bleu']:.2f} (best {progress.best_bleu:.2f} at {progress.best_step})")
    if cfg.train.patience and progress.bad_validations >= cfg.train.patience:
        return "early stopping"
    return None


def finish(run: Run, last: dict, stop_reason: str | None) -> dict:
    """The last validation and checkpoint (a preempted run only saves: its grace period is short)."""
    step, tcfg = run.step, run.cfg.train
    run.bar.close()
    if stop_reason == "nonfinite":
        raise TrainingStopped(
            f"non-finite loss or gradient at or before step {step}; stopped (train.on_nonfinite=stop), "
            f"last good checkpoint: step {run.checkpoints.latest_step()}"
        )
    preempted = (stop_reason or "").startswith("signal ")
    if run.data.valid_batches and tcfg.eval_every and step % tcfg.eval_every and not preempted:
        validate_loss(run, step)
    if run.checkpoints.latest_step() != step:
        run.checkpoints.save(step, run.state, run.meta())
    if run.is_main:
        print(f"stopped at step {step}" + (f" ({stop_reason})" if stop_reason else "") +
              f"; checkpoint in {run.checkpoints.directory}", flush=True)
    return {**last, "step": step, "stop_reason": stop_reason}  # the step reached, not the last logged one
