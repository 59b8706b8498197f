"""The run directory: its layout, and how a run is opened, restored and copied.

`train` writes a run directory; `translate`, `evaluate`, `score`, `average`, `plot` and
`train --init-from` read one. Only this module knows the names inside it:

    config.yaml          the resolved config
    spm.model            SentencePiece (spm.src.model + spm.tgt.model when not joint)
    checkpoints/<step>/  train state and JSON record (orbax)
    best/<step>/         the checkpoint with the best validation BLEU
    metrics.jsonl        one JSON record per log or validation
    tb/                  TensorBoard events
    averaged.json        (runs written by `average`) the checkpoints averaged into it
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
from flax import nnx

from transformer_mt import config as config_lib
from transformer_mt import program_store
from transformer_mt import sharding
from transformer_mt import tokenizer as tok_lib
from transformer_mt import train_step as ts
from transformer_mt.checkpoint import CheckpointDamaged, CheckpointMismatch, Checkpoints, first_difference
from transformer_mt.config import Config, ConfigError
from transformer_mt.model import Transformer
from transformer_mt.textio import warn

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
TENSORBOARD_DIR = "tb"
AVERAGED_FILE = "averaged.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / BEST_DIR


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def build_model(cfg: Config, src_vocab: int, tgt_vocab: int) -> Transformer:
    return Transformer(cfg.model, src_vocab, tgt_vocab, nnx.Rngs(params=cfg.train.seed))


def abstract_model(cfg: Config, src_vocab: int, tgt_vocab: int):
    """(graphdef, params as ShapeDtypeStructs) of the model `cfg` describes, without computing it.

    Tracing the model's initializers for their shapes takes 2-3 s on a 2-core CPU (173 random
    draws), more than the rest of a translation's start; the result is kept in the program store
    (program_store.py) under the code and the config, and read back in ~10 ms."""
    def trace():
        model = nnx.eval_shape(lambda: build_model(cfg, src_vocab, tgt_vocab))
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    return program_store.remembered("models", (repr(cfg.model), src_vocab, tgt_vocab, cfg.train.seed), trace)


def load_config(run_dir: str | Path) -> Config:
    """The run's own config.yaml; a one-line error when run_dir is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory: no {CONFIG_FILE}")
    return config_lib.load(run_dir / CONFIG_FILE)


def load_tokenizer(run_dir: str | Path) -> tok_lib.Tokenizer:
    return tok_lib.load_from_run(run_dir)


def copy_tokenizer(src_run: str | Path, dst_run: str | Path) -> tok_lib.Tokenizer:
    """Copies src_run's SentencePiece model(s) into dst_run, removing a stale one of the other kind
    (a joint spm.model would otherwise shadow copied separate models)."""
    tok = load_tokenizer(src_run)
    dst_run = Path(dst_run)
    dst_run.mkdir(parents=True, exist_ok=True)
    stale = (tok_lib.SRC_FILE, tok_lib.TGT_FILE) if tok.joint else (tok_lib.JOINT_FILE,)
    for name in stale:
        (dst_run / name).unlink(missing_ok=True)
    tok.save(dst_run)
    return load_tokenizer(dst_run)


# ----------------------------------------------------------------------------- checkpoints


def candidate_steps(run_dir: Path, step: int | None, last: bool) -> list[tuple[Path, int]]:
    """(checkpoint directory, step) in order of preference: --step if given, else the best-BLEU
    checkpoint, then the others newest first (later ones are fallbacks for a damaged one)."""
    run_dir = Path(run_dir)
    ckpt_dirs = [best_dir(run_dir), checkpoints_dir(run_dir)]
    if step is None and last:
        ckpt_dirs = ckpt_dirs[1:]
    found = []
    for directory in ckpt_dirs:
        if not directory.is_dir():
            continue
        steps = Checkpoints(directory, create=False).steps()
        if step is not None and step in steps:
            return [(directory, step)]
        if step is None:
            found += [(directory, s) for s in reversed(steps)]
    if step is not None:
        raise ConfigError(f"no checkpoint for step {step} in {run_dir}")
    if not found:
        raise ConfigError(f"no checkpoint in {run_dir} (expected {run_dir}/{CHECKPOINTS_DIR}/<step>)")
    return found


def resolve_step(run_dir: Path, step: int | None, last: bool) -> tuple[Path, int]:
    """(checkpoint directory, step) that `translate` tries first."""
    return candidate_steps(run_dir, step, last)[0]


class Restored(NamedTuple):
    state: Any  # {params, opt_state, step, rng} ({params} when only they were read), replicated
    meta: dict  # the checkpoint's JSON record ({} when only the params were read)
    directory: Path
    step: int


class Run:
    """A run directory opened for reading: config, tokenizer, and the train state's shapes
    (built from config.yaml and the tokenizer, so a checkpoint of another model is caught)."""

    def __init__(self, run_dir: str | Path, params_only: bool = False):
        """params_only: the model's params alone (what translating, scoring and --init-from
        restore), their structure taken from the program store when it has it."""
        self.path = Path(run_dir)
        self.cfg = load_config(self.path)
        self.tok = load_tokenizer(self.path)
        self.params_only = params_only
        if params_only:
            self.graphdef, params = abstract_model(self.cfg, self.tok.src_vocab_size, self.tok.tgt_vocab_size)
            abstract = {"params": params}
        else:
            tx = ts.make_optimizer(self.cfg.train)

            def init():
                model = build_model(self.cfg, self.tok.src_vocab_size, self.tok.tgt_vocab_size)
                return ts.init_state(model, tx, self.cfg.train.seed)

            self.graphdef, abstract = nnx.eval_shape(init)
        self.mesh = sharding.make_mesh()
        repl = sharding.replicated(self.mesh)
        self.target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)

    def restore(self, directory: Path, step: int, params_only: bool = False) -> Restored:
        """One checkpoint (only its params with params_only: what translation needs, 5x faster);
        raises CheckpointMismatch (another model) or CheckpointDamaged."""
        checkpoints = Checkpoints(directory, create=False)
        if params_only or self.params_only:
            return Restored({"params": checkpoints.restore_params(step, self.target["params"])}, {}, Path(directory),
                            step)
        state, meta = checkpoints.restore(step, self.target)
        return Restored(state, meta, Path(directory), step)

    def restore_first(self, candidates: list[tuple[Path, int]], params_only: bool = False) -> Restored:
        """The first candidate that restores; a damaged one is skipped with a warning."""
        failures = []
        for directory, step in candidates:
            try:
                return self.restore(directory, step, params_only)
            except CheckpointDamaged as e:  # a mismatch (CheckpointMismatch) is the user's to fix: raised
                failures.append(str(e))
                if len(candidates) > len(failures):
                    warn(f"{e}; trying the next one")
        raise ConfigError(f"no checkpoint of {self.path} can be restored: " + "; ".join(failures))


def load_run(run_dir: str | Path, step: int | None = None, last: bool = False):
    """(cfg, graphdef, params, tokenizer, step, mesh) from a run directory written by `train`.

    A damaged checkpoint is skipped with a warning in favour of the next candidate; one that
    holds a different model than config.yaml and the tokenizer describe is an error.
    """
    run = Run(run_dir, params_only=True)
    restored = run.restore_first(candidate_steps(run.path, step, last), params_only=True)
    return run.cfg, run.graphdef, restored.state["params"], run.tok, restored.step, run.mesh


# ----------------------------------------------------------------------------- fine-tuning


def parse_checkpoint_path(text: str) -> tuple[Path, int | None]:
    """RUN, RUN/STEP, RUN/checkpoints/STEP or RUN/best/STEP -> (run directory, step or None)."""
    path = Path(text)
    if (path / CONFIG_FILE).is_file():
        return path, None
    if path.name.isdigit():
        if (path.parent / CONFIG_FILE).is_file():
            return path.parent, int(path.name)
        if path.parent.name in (CHECKPOINTS_DIR, BEST_DIR) and (path.parent.parent / CONFIG_FILE).is_file():
            return path.parent.parent, int(path.name)
    raise ConfigError(f"{text} is neither a run directory (no {CONFIG_FILE}) nor RUN/STEP of one")


def init_params(source: str, params: Any, mesh) -> tuple[Any, str]:
    """(params of checkpoint `source`, where they came from) in place of `params`, whose model must
    have the same arrays with the same shapes; the first array that differs is named."""
    run_dir, step = parse_checkpoint_path(source)
    run = Run(run_dir, params_only=True)
    candidates = candidate_steps(run.path, step, False)
    restored = run.restore_first(candidates, params_only=True)
    where = f"{restored.directory}/{restored.step}"
    difference = first_difference(params, restored.state["params"], ("this model", "the checkpoint"))
    if difference:
        raise CheckpointMismatch(f"--init-from {where} does not fit this model: {difference}")
    return sharding.put_state(mesh, restored.state["params"]), where
