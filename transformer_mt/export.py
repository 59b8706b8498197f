"""`export`: a run's checkpoint as a CTranslate2 model directory, to deploy where we do not run.

The model is written through CTranslate2's own converter API (a `TransformerSpec` filled from our
parameters), with our sinusoidal table written in explicitly: CTranslate2's generated table
starts at position 1 (OpenNMT's convention), ours at 0. The directory also holds the
SentencePiece model(s) and `tokenize.json`, so that `ctranslate2.Translator` and `sentencepiece`
alone translate with it (README, "Export to CTranslate2"). It is built in a temporary directory
beside the destination and renamed into place, so a failed or killed export leaves no directory.

What CTranslate2's spec cannot express (rotary positions) is refused with one line naming the
setting; everything else is carried exactly: pre/post-norm, the pre-norm stacks' final norms,
sqrt(d_model) embedding scaling, the tied output projection, ReLU, LayerNorm epsilon 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from transformer_mt import tokenizer as tok_lib
from transformer_mt.config import Config, ConfigError
from transformer_mt.model import sinusoidal_positions
from transformer_mt.rundir import load_config, load_run

FORMATS = ("ctranslate2",)
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16")
LAYER_NORM_EPSILON = 1e-5  # model.Residual and the final norms
POSITIONS = 1024  # rows of the position table: CTranslate2's default max_input_length
TOKENIZE_FILE = "tokenize.json"
SPECIAL_PIECES = {tok_lib.PAD_ID: "<pad>", tok_lib.UNK_ID: "<unk>", tok_lib.BOS_ID: "<s>", tok_lib.EOS_ID: "</s>"}
MISSING = "exporting to CTranslate2 needs the ctranslate2 package: pip install 'transformer_mt[export]'"


def require_ctranslate2():
    """The ctranslate2 module, or a one-line ConfigError saying how to install it."""
    try:
        import ctranslate2
        import ctranslate2.converters  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None
    return ctranslate2


def check_exportable(cfg: Config) -> None:
    """One line naming the first setting a CTranslate2 TransformerSpec cannot express."""
    m = cfg.model
    if m.positional != "sinusoidal":
        raise ConfigError(f"model.positional={m.positional} cannot be exported to CTranslate2: its encoder-decoder "
                          "Transformer takes absolute (sinusoidal) positions only")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not a multiple of model.num_heads={m.num_heads}")


def position_table(d_model: int, rows: int = POSITIONS) -> np.ndarray:
    """[rows, d_model] float32: row p is what our model adds at position p (counted from 0)."""
    return np.array(sinusoidal_positions(np.arange(rows), d_model), np.float32)


class _Params:
    """The checkpoint's parameters as numpy arrays by dotted path, each read once with its
    shape checked against what the config says it must be."""

    def __init__(self, params, cfg: Config, src_vocab: int, tgt_vocab: int):
        flat = {}

        def walk(prefix, node):
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), value)
            else:
                flat[prefix] = np.array(node, np.float32)  # writable: quantization works in place

        walk("", nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
        self.flat, self.used = flat, set()
        self.d, self.ffn_dim = cfg.model.d_model, cfg.model.ffn_dim
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.flat:
            raise ConfigError(f"checkpoint has no parameter {name}: not a model of this config")
        x = self.flat[name]
        if x.shape != shape:
            raise ConfigError(f"checkpoint parameter {name} has shape {x.shape}, the config says {shape}")
        self.used.add(name)
        return x

    def linear(self, spec, name: str, n_in: int, n_out: int) -> None:
        """Our kernel is [in, out]; CTranslate2's weight is [out, in]."""
        spec.weight = np.ascontiguousarray(self.get(f"{name}.kernel", (n_in, n_out)).T)
        spec.bias = self.get(f"{name}.bias", (n_out,))

    def norm(self, spec, name: str) -> None:
        spec.gamma = self.get(f"{name}.scale", (self.d,))
        spec.beta = self.get(f"{name}.bias", (self.d,))

    def attention(self, spec, name: str, self_attention: bool) -> None:
        """Self-attention: one fused [3D, D] query-key-value projection; cross-attention: the
        query [D, D], then keys and values fused [2D, D] (as CTranslate2 lays them out)."""
        d = self.d
        q, k, v = (self.get(f"{name}.{p}.kernel", (d, d)).T for p in ("query", "key", "value"))
        qb, kb, vb = (self.get(f"{name}.{p}.bias", (d,)) for p in ("query", "key", "value"))
        if self_attention:
            spec.linear[0].weight, spec.linear[0].bias = np.concatenate([q, k, v]), np.concatenate([qb, kb, vb])
        else:
            spec.linear[0].weight, spec.linear[0].bias = np.ascontiguousarray(q), qb
            spec.linear[1].weight, spec.linear[1].bias = np.concatenate([k, v]), np.concatenate([kb, vb])
        self.linear(spec.linear[-1], f"{name}.out", d, d)

    def ffn(self, spec, name: str) -> None:
        self.linear(spec.linear_0, f"{name}.inner", self.d, self.ffn_dim)
        self.linear(spec.linear_1, f"{name}.outer", self.ffn_dim, self.d)


def build_spec(cfg: Config, params, tok: tok_lib.Tokenizer):
    """A CTranslate2 TransformerSpec holding the model of cfg with these parameters."""
    require_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    check_exportable(cfg)
    m = cfg.model
    p = _Params(params, cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    spec = transformer_spec.TransformerSpec.from_config(
        (m.num_encoder_layers, m.num_decoder_layers), m.num_heads, pre_norm=m.pre_norm,
        activation=common_spec.Activation.RELU)
    table = position_table(m.d_model)
    src_embed = p.get("src_embed.embedding", (tok.src_vocab_size, m.d_model))
    tgt_embed = src_embed if m.tie_embeddings else p.get("tgt_embed.embedding", (tok.tgt_vocab_size, m.d_model))

    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight, dec.embeddings.weight = src_embed, tgt_embed
    enc.scale_embeddings = dec.scale_embeddings = True  # x * sqrt(d_model), as model._embed
    enc.position_encodings.encodings = dec.position_encodings.encodings = table
    dec.start_from_zero_embedding = False  # the decoder starts from BOS's embedding
    for i, layer in enumerate(enc.layer):
        name = f"encoder_layers.{i}"
        p.attention(layer.self_attention, f"{name}.self_attn", self_attention=True)
        p.norm(layer.self_attention.layer_norm, f"{name}.attn_block.norm")
        p.ffn(layer.ffn, f"{name}.ffn")
        p.norm(layer.ffn.layer_norm, f"{name}.ffn_block.norm")
    for i, layer in enumerate(dec.layer):
        name = f"decoder_layers.{i}"
        p.attention(layer.self_attention, f"{name}.self_attn", self_attention=True)
        p.norm(layer.self_attention.layer_norm, f"{name}.self_block.norm")
        p.attention(layer.attention, f"{name}.cross_attn", self_attention=False)
        p.norm(layer.attention.layer_norm, f"{name}.cross_block.norm")
        p.ffn(layer.ffn, f"{name}.ffn")
        p.norm(layer.ffn.layer_norm, f"{name}.ffn_block.norm")
    if m.pre_norm:  # post-norm stacks have no final norm, in either model
        p.norm(enc.layer_norm, "encoder_norm")
        p.norm(dec.layer_norm, "decoder_norm")
    if m.tie_embeddings:
        dec.projection.weight = tgt_embed
    else:  # logits = h @ kernel; CTranslate2 keeps it as [V, D]
        dec.projection.weight = np.ascontiguousarray(p.get("output.kernel", (m.d_model, tok.tgt_vocab_size)).T)
    unused = sorted(set(p.flat) - p.used)
    if unused:
        raise ConfigError(f"checkpoint parameter {unused[0]} has no place in a CTranslate2 Transformer")

    spec.register_source_vocabulary(vocabulary(tok.src))
    spec.register_target_vocabulary(vocabulary(tok.tgt))
    spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
    spec.config.unk_token, spec.config.bos_token = SPECIAL_PIECES[tok_lib.UNK_ID], SPECIAL_PIECES[tok_lib.BOS_ID]
    spec.config.eos_token = SPECIAL_PIECES[tok_lib.EOS_ID]
    spec.config.decoder_start_token = SPECIAL_PIECES[tok_lib.BOS_ID]  # our decoder starts from BOS
    spec.config.add_source_eos = True  # as Tokenizer.encode_src
    return spec


def vocabulary(sp) -> list[str]:
    """The pieces by id; CTranslate2 maps pieces to ids through this list, so they must be
    distinct and the special ids must hold the special pieces its config names."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for i, piece in SPECIAL_PIECES.items():
        if pieces[i] != piece:
            raise ConfigError(f"tokenizer piece {i} is {pieces[i]!r}, expected {piece!r}")
    if len(set(pieces)) != len(pieces):
        raise ConfigError("tokenizer has repeated pieces: CTranslate2 maps pieces to ids one to one")
    return pieces


def tokenize_description(cfg: Config, tok: tok_lib.Tokenizer) -> dict:
    """What tokenize.json says: how text becomes the pieces the model takes, and back."""
    names = ["spm.model"] if tok.joint else ["spm.src.model", "spm.tgt.model"]
    d = cfg.decode
    return {
        "source_spm": names[0],
        "target_spm": names[-1],
        "source_input": "pieces: SentencePieceProcessor.encode(text, out_type=str)",
        "source_eos": "added by CTranslate2 (config.json add_source_eos); do not append </s>",
        "target_output": "pieces without </s>: SentencePieceProcessor.decode(pieces)",
        "decoder_start": SPECIAL_PIECES[tok_lib.BOS_ID],
        "never_output": [SPECIAL_PIECES[tok_lib.PAD_ID], SPECIAL_PIECES[tok_lib.BOS_ID]],
        "decode": {"beam_size": d.beam_size, "alpha": d.alpha, "max_len_a": d.max_len_a, "max_len_b": d.max_len_b,
                   "max_len_cap": d.max_len_cap},
        "same_as_transformer_mt": "min_decoding_length=0, max_decoding_length=min(max_len_cap, floor(max_len_a * "
                                  "(source pieces + 1) + max_len_b)) - 1; greedy: beam_size=1, suppress_sequences="
                                  "[['<pad>'], ['<s>']]; beam: beam_size=N, length_penalty=0, as transformer-mt "
                                  "translate --alpha 0 (transformer_mt/export_check.py)",
    }


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, last: bool = False,
           quantization: str = "float32") -> tuple[Path, int]:
    """Writes run_dir's checkpoint as a CTranslate2 model into out_dir (which must not exist);
    returns (out_dir, checkpoint step)."""
    require_ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists: remove it or name another directory")
    check_exportable(load_config(run_dir))  # before the checkpoint is read
    cfg, _, params, tok, step, _ = load_run(run_dir, step, last)
    spec = build_spec(cfg, params, tok)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write(spec, tmp, quantization)
        for src in tok.paths:
            shutil.copyfile(src, tmp / ("spm.model" if tok.joint else src.name))
        description = {**tokenize_description(cfg, tok), "checkpoint": f"{Path(run_dir).resolve()}@{step}",
                       "quantization": quantization}
        (tmp / TOKENIZE_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir)  # atomic on one filesystem: out_dir appears whole or not at all
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, step


def _write(spec, directory: Path, quantization: str) -> None:
    """Validates, quantizes and saves spec into directory through CTranslate2's Converter."""
    from ctranslate2.converters import Converter

    class SpecConverter(Converter):
        def _load(self):
            return spec

    SpecConverter().convert(str(directory), quantization=quantization, force=True)


def export_command(args) -> int:
    if args.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}")
    out, step = export(args.checkpoint, args.output, args.step, args.last, args.quantization)
    print(f"exported checkpoint step {step} to {out} (CTranslate2, {args.quantization})", file=sys.stderr)
    return 0
