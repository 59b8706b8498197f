"""JAX's persistent compilation cache, on by default, so a second run of the same model starts
in seconds instead of recompiling every program.

Where: `--compile-cache DIR`, else $JAX_COMPILATION_CACHE_DIR, else
$XDG_CACHE_HOME/transformer_mt/jax (~/.cache/transformer_mt/jax). Off with `--no-compile-cache`
or TRANSFORMER_MT_NO_COMPILE_CACHE=1. Entries are keyed by the program, the jax/XLA version and
the device, so a stale entry is never used; deleting the directory is always safe.

Trained tokenizers are kept there too (tokenizers/<hash of text and settings>/), for the same
reason: SentencePiece training is the largest part of a new run's start-up that jax cannot cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_dir() -> Path:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transformer_mt" / "jax"


def enable(directory: str | os.PathLike | None = None, disabled: bool = False) -> Path | None:
    """Points jax at the cache directory (created if needed); returns it, or None when off.

    Every program is cached, however quick its compile: the many small decode and validation
    programs add up to most of a short command's start-up.
    """
    import jax

    if disabled or os.environ.get("TRANSFORMER_MT_NO_COMPILE_CACHE") == "1":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(directory) if directory else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs speed
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def tokenizer_dir() -> Path | None:
    """Where trained tokenizers are kept: beside the compiled programs, or None when caching is off."""
    import jax

    directory = jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache or not directory:
        return None
    return Path(directory) / "tokenizers"
