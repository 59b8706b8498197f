"""The training loop: data, mesh, jit, logging, validation, checkpoints, resume.

The step functions themselves are pure (train_step.py); here they are jit-compiled once per
process (see compiled_steps) with explicit shardings and donated state.
"""

from __future__ import annotations

import functools
import json
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
from tqdm import tqdm

from transformer_mt import compile_cache
from transformer_mt import config as config_lib
from transformer_mt import data as data_lib
from transformer_mt import rundir
from transformer_mt import sharding
from transformer_mt import tokenizer as tok_lib
from transformer_mt import train_step as ts
from transformer_mt.checkpoint import Checkpoints, complete_steps
from transformer_mt.config import Config, ConfigError
from transformer_mt.model import count_params
from transformer_mt.rundir import CONFIG_FILE, METRICS_FILE, build_model


# Test hook (tests/test_faults.py, benchmarks/kill_resume.py): with this set to N, the run waits
# after step N (before N+1) until it is signalled. A test that plans to kill the run at some later
# moment holds it before its last step, so the run can never finish before that moment comes.
HOLD_ENV = "TRANSFORMER_MT_TEST_HOLD_AT_STEP"
_LAUNCHER = os.getppid()  # noted at import: a held run whose launcher is gone stops (StopSignal.wait)


class TrainingStopped(RuntimeError):
    """Training ended early for a reason the user must see (e.g. a non-finite loss)."""


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
    return CompiledSteps(
        micro=jax.jit(ts.bind(ts.micro_grads, graphdef=graphdef, smoothing=smoothing)),
        apply=jax.jit(ts.bind(ts.apply_grads, tx=tx), donate_argnums=0, out_shardings=(state_sh, repl)),
        fused=jax.jit(ts.bind(ts.train_step, graphdef=graphdef, tx=tx, smoothing=smoothing),
                      donate_argnums=0, out_shardings=(state_sh, repl)),
        add=jax.jit(ts.accumulate, donate_argnums=0),
        evaluate=jax.jit(ts.bind(ts.eval_step, graphdef=graphdef, smoothing=smoothing)),
    )


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


class StopSignal:
    """Turns SIGTERM/SIGINT (preemption notice, Ctrl-C) into a flag checked between steps."""

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


def train(cfg: Config | None, workdir: str | Path, resume: bool = False, overrides: list[str] | None = None,
          progress_bar: bool = True, init_from: str | None = None) -> dict:
    """Trains (or resumes) a run in `workdir`; returns the last logged metrics.

    init_from (RUN or RUN/STEP): a run without checkpoints starts from that checkpoint's
    parameters and tokenizer, with a fresh optimizer and step (fine-tuning).
    """
    sharding.maybe_initialize_distributed()
    workdir = Path(workdir)
    cfg = prepare_workdir(workdir, cfg, resume, overrides or [])
    is_main = jax.process_index() == 0
    tcfg, dcfg = cfg.train, cfg.data

    # Data and tokenizer.
    train_src, train_tgt = data_lib.load_split(dcfg, "train")
    if init_from and is_main and not (resume and complete_steps(rundir.checkpoints_dir(workdir))):
        rundir.copy_tokenizer(rundir.parse_checkpoint_path(init_from)[0], workdir)
    if jax.process_count() > 1:
        # Process 0 trains (or copies) the tokenizer into the shared run directory; the rest wait.
        from jax.experimental import multihost_utils

        if is_main:
            tok_lib.load_or_train(cfg.tokenizer, workdir, lambda: (train_src, train_tgt), tcfg.seed,
                                  compile_cache.tokenizer_dir())
        multihost_utils.sync_global_devices("tokenizer ready")
    tok = tok_lib.load_or_train(cfg.tokenizer, workdir, lambda: (train_src, train_tgt), tcfg.seed,
                                compile_cache.tokenizer_dir())
    mesh = sharding.make_mesh()
    rows_multiple = sharding.data_size(mesh)
    train_examples = data_lib.tokenize_pairs(tok, train_src, train_tgt, dcfg.max_len)
    stream = data_lib.TrainStream(train_examples, dcfg, tcfg.seed, rows_multiple,
                                  jax.process_index(), jax.process_count())
    valid_src, valid_tgt = data_lib.load_split(dcfg, "valid")
    valid_examples = data_lib.tokenize_pairs(tok, valid_src, valid_tgt, (dcfg.pack_lengths or dcfg.bucket_lengths)[-1])
    valid_batches = data_lib.eval_batches(valid_examples, dcfg, rows_multiple, jax.process_index(),
                                          jax.process_count()) if len(valid_examples) else []

    # Model, optimizer, state.
    model = build_model(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    tx = ts.make_optimizer(tcfg)
    graphdef, state = ts.init_state(model, tx, tcfg.seed)
    del model
    state = sharding.put_state(mesh, state)

    checkpoints = Checkpoints(workdir / "checkpoints", keep=tcfg.keep_checkpoints)
    best = Checkpoints(workdir / "best", keep=1)
    progress = Progress()
    restored = checkpoints.restore_newest(state) if resume else None
    if restored is not None:
        state, meta, _ = restored
        stream.set_position(meta["data_position"])
        progress = Progress(**meta["progress"])
    elif init_from:
        params, source = rundir.init_params(init_from, state["params"], mesh)
        state = {**state, "params": params}
        if is_main:
            print(f"parameters from {source}; optimizer and step fresh", flush=True)
    start_step = int(state["step"])
    if resume and is_main:
        # Whatever a killed run wrote after this checkpoint is redone, identically, from here.
        best.delete_after(start_step)
        truncate_metrics(workdir / METRICS_FILE, start_step)

    state_leaves, state_treedef = jax.tree.flatten(sharding.state_sharding(mesh, state))
    steps = compiled_steps(graphdef, ts.OptimizerSettings.of(tcfg), tcfg.label_smoothing, mesh, state_treedef,
                           tuple(state_leaves))

    def one_step(state):
        if tcfg.grad_accum == 1:
            return steps.fused(state, sharding.put_batch(mesh, next(stream)))
        acc = None
        for i in range(tcfg.grad_accum):
            out = steps.micro(state, sharding.put_batch(mesh, next(stream)), jnp.int32(i))
            acc = out if acc is None else steps.add(acc, *out)
        return steps.apply(state, *acc)

    def meta() -> dict:
        # Steps since the last log record travel with the checkpoint, so that a run resumed between
        # two records logs the same averages as a run never stopped.
        unlogged = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        return {"data_position": stream.position, "progress": progress.__dict__,
                "config": config_lib.to_dict(cfg), "step": int(state["step"]), "unlogged_metrics": unlogged}

    log = MetricsLog(workdir, is_main, purge_step=start_step + 1 if resume else None)
    if is_main:
        n_params = count_params(nnx.merge(graphdef, state["params"]))
        print(f"model: {n_params / 1e6:.2f}M parameters; vocab {tok.src_vocab_size}/{tok.tgt_vocab_size}; "
              f"{len(train_examples)} training pairs; {len(jax.devices())} device(s); from step {start_step}",
              flush=True)

    translator = None
    if tcfg.bleu_every:
        from transformer_mt.search import Translator

        translator = Translator(cfg, graphdef, tok, mesh)
        bleu_src = valid_src[: tcfg.bleu_subset] if tcfg.bleu_subset else valid_src
        bleu_ref = valid_tgt[: tcfg.bleu_subset] if tcfg.bleu_subset else valid_tgt

    last: dict[str, Any] = {}
    pending: list = list(restored[1].get("unlogged_metrics", [])) if restored is not None else []
    t_start = time.time()
    t_log, step = time.time(), start_step
    bar = tqdm(total=tcfg.max_steps, initial=start_step, disable=not (progress_bar and is_main),
               dynamic_ncols=True, desc="train")
    stop_reason = None
    hold_at = int(os.environ.get(HOLD_ENV) or -1)
    with StopSignal() as stop:
        while step < tcfg.max_steps:
            if step == hold_at:
                stop_reason = f"signal {stop.wait()}"
                break
            state, metrics = one_step(state)
            step += 1
            pending.append(metrics)
            bar.update(1)
            if tcfg.log_every and step % tcfg.log_every == 0 or step == tcfg.max_steps:
                last = _summarise(jax.device_get(pending), step, time.time() - t_log,
                                  float(ts.inverse_sqrt_schedule(tcfg.learning_rate, tcfg.warmup_steps)(step - 1)))
                pending, t_log = [], time.time()
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
                if last["nonfinite_steps"] and tcfg.on_nonfinite == "stop":
                    stop_reason = "nonfinite"
                    break
                if last["nonfinite_steps"]:
                    tqdm.write(f"warning: skipped {last['nonfinite_steps']} step(s) with a non-finite loss or gradient before step {step}")
            if tcfg.eval_every and step % tcfg.eval_every == 0 and valid_batches:
                record = _validate(steps.evaluate, state["params"], valid_batches, mesh, step)
                log.write(record, "valid")
                tqdm.write(f"step {step}: valid loss {record['loss']:.4f} nll {record['nll']:.4f} acc {record['accuracy']:.3f}")
            if translator is not None and step % tcfg.bleu_every == 0:
                record = _validate_bleu(translator, state["params"], bleu_src, bleu_ref, cfg, step)
                log.write(record, "valid")
                improved = record["bleu"] > progress.best_bleu
                progress.history.append([step, record["bleu"]])
                if improved:
                    progress.best_bleu, progress.best_step, progress.bad_validations = record["bleu"], step, 0
                else:
                    progress.bad_validations += 1
                tqdm.write(f"step {step}: valid BLEU {record['bleu']:.2f} (best {progress.best_bleu:.2f} at {progress.best_step})")
                if improved:
                    best.save(step, state, meta())
                if tcfg.patience and progress.bad_validations >= tcfg.patience:
                    stop_reason = "early stopping"
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                checkpoints.save(step, state, meta())
            if tcfg.time_limit_minutes and time.time() - t_start > 60 * tcfg.time_limit_minutes:
                stop_reason = stop_reason or "time limit"
            if stop.received and step < tcfg.max_steps:  # at the last step the run is simply done
                stop_reason = f"signal {stop.received}"
            if stop_reason:
                break
        bar.close()
        if stop_reason == "nonfinite":
            checkpoints.close()
            best.close()
            log.close()
            raise TrainingStopped(
                f"non-finite loss or gradient at or before step {step}; stopped (train.on_nonfinite=stop), "
                f"last good checkpoint: step {checkpoints.latest_step()}"
            )
        # A preempted run saves at once (the grace period is short); validation waits for the real end.
        preempted = (stop_reason or "").startswith("signal ")
        if valid_batches and tcfg.eval_every and step % tcfg.eval_every and not preempted:
            record = _validate(steps.evaluate, state["params"], valid_batches, mesh, step)  # final validation
            log.write(record, "valid")
            tqdm.write(f"step {step}: valid loss {record['loss']:.4f} nll {record['nll']:.4f} acc {record['accuracy']:.3f}")
        if checkpoints.latest_step() != step:
            checkpoints.save(step, state, meta())
        checkpoints.close()
        best.close()
    log.close()
    if is_main:
        print(f"stopped at step {step}" + (f" ({stop_reason})" if stop_reason else "") +
              f"; checkpoint in {checkpoints.directory}", flush=True)
    return {**last, "step": step, "stop_reason": stop_reason}  # the step reached, not the last logged one


def _summarise(pending: list[dict], step: int, seconds: float, lr: float) -> dict:
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
        "nonfinite_steps": len(pending) - len(finite),
    }


def _validate(evaluate, params, batches, mesh, step: int) -> dict:
    totals = None
    for batch in batches:
        out = evaluate(params, sharding.put_batch(mesh, batch))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    tokens = max(float(totals["tokens"]), 1.0)
    nll = float(totals["nll_sum"]) / tokens
    return {"step": step, "split": "valid", "loss": float(totals["loss_sum"]) / tokens, "nll": nll,
            "ppl": float(np.exp(min(nll, 50.0))), "accuracy": float(totals["correct"]) / tokens}


def _validate_bleu(translator, params, src, ref, cfg: Config, step: int) -> dict:
    from transformer_mt.metrics import corpus_scores

    hyps = translator.translate(params, src, beam_size=cfg.decode.beam_size, alpha=cfg.decode.alpha)
    scores = corpus_scores(hyps, ref)
    return {"step": step, "split": "valid", "bleu": scores["bleu"], "chrf": scores["chrf"]}
