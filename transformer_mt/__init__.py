"""transformer_mt: encoder-decoder Transformer machine translation in JAX/Flax.

Module map (docs/architecture.md draws it; imports run downwards only, tests/test_imports.py):

    cli                      argument parsing; imports each command's module when it runs
    trainer, translate, evaluate, score, attention, average, plot     one command each
    alignment                word alignments from cross-attention (translate --alignment)
    search                   SearchSettings, compiled search, Translator: the entry point to a model
    teacher_forcing          batched teacher forcing: log-prob sums, attention weights
    decode_batches           batch planning for decoding
    rundir, checkpoint       run directory layout and loading; orbax checkpoints
    train_step, model, decode, losses, matmul     steps, the Transformer, search loops, loss, dots
    data, tokenizer, textio  files -> ids -> batches; SentencePiece; lines in and out
    config, sharding, metrics, compile_cache      config dataclasses, mesh, sacreBLEU, jit cache
"""

__version__ = "0.1.0"
