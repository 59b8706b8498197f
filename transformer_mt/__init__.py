"""transformer_mt: encoder-decoder Transformer machine translation in JAX/Flax."""

__version__ = "0.1.0"
