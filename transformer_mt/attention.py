"""`attention`: the attention weights of one sentence pair, drawn as a grid of heatmaps.

The weights come from one teacher-forcing pass (Translator.attention_weights), over the model's
own greedy translation or a given target. Row t of a decoder panel is the step that outputs
target piece t (the last row outputs </s>), as in alignment tools; `translate --alignment`
(alignment.py) reads the same pass. matplotlib is an optional extra
(`pip install 'transformer_mt[plot]'`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from transformer_mt.config import ConfigError
from transformer_mt.rundir import load_run
from transformer_mt.search import Translator, settings_from
from transformer_mt.textio import clean_line
from transformer_mt.tokenizer import EOS_ID

EXTRA_HINT = "pip install 'transformer_mt[plot]'"
MAX_PLOT_TOKENS = 100  # per side: beyond this the labels of a panel cannot be read anyway


# ----------------------------------------------------------------------------- drawing


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"attention plots need matplotlib, an optional extra: {EXTRA_HINT}") from None
    return Figure


def image_format(output: str | Path) -> str:
    """The format named by output's extension; checked before any work (a missing extra too)."""
    fmt = Path(output).suffix.lstrip(".").lower()
    if fmt not in _figure_class()().canvas.get_supported_filetypes():
        raise ConfigError(f"-o {output}: unknown image format '{fmt}' (use .png, .pdf or .svg)")
    return fmt


CELL = 0.22  # inches per token: room for one 8-point tick label
FONT = 8
DPI = 110
MAX_PIXELS = 100e6  # an RGBA raster of 400 MB; matplotlib refuses 2**16 pixels on a side anyway
VECTOR_FORMATS = {"pdf", "svg", "svgz", "eps", "ps"}


def plot_attention(sections: Sequence[tuple[str, np.ndarray, list[str], list[str]]], output: str | Path,
                   title: str = "") -> Path:
    """Draws each section (name, weights [layers, heads, queries, keys], query labels, key labels)
    as a grid of heatmaps, a row per layer and a column per head, into `output` (format from its
    extension). Every panel shares the scale 0..1, so heads compare at a glance."""
    output, fmt = Path(output), image_format(output)
    fig = _figure_class()(layout="constrained")
    # CELL inches per token in each panel, a gap between panels, and room for the tick labels
    # (first column, bottom row), the titles and the colour bar.
    label_room = CELL + FONT / 72 * 0.6 * max(len(x) for _, _, q, k in sections for x in q + k)
    widths = [w.shape[1] * (max(len(k), 6) * CELL + label_room / 3) + label_room + 1.2 for _, w, _, k in sections]
    heights = [w.shape[0] * max(len(q), 6) * CELL + label_room + 0.6 for _, w, q, _ in sections]
    size = (max(max(widths), 4), sum(heights) + (0.4 if title else 0))
    pixels = (round(size[0] * DPI), round(size[1] * DPI))
    if fmt not in VECTOR_FORMATS and (max(pixels) >= 2**16 or pixels[0] * pixels[1] > MAX_PIXELS):
        raise ConfigError(f"the image would be {pixels[0]} x {pixels[1]} pixels: too large; take a shorter "
                          "sentence, leave out --self, or write .pdf / .svg")
    fig.set_size_inches(*size)
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for subfig, (name, weights, queries, keys) in zip(subfigs, sections):
        layers, heads = weights.shape[:2]
        axes = subfig.subplots(layers, heads, squeeze=False, sharex=True, sharey=True)
        for layer in range(layers):
            for head in range(heads):
                ax = axes[layer, head]
                image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0,
                                  interpolation="nearest", aspect="auto")
                ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", rotation_mode="anchor", fontsize=FONT)
                ax.set_yticks(range(len(queries)), queries, fontsize=FONT)
                ax.tick_params(length=2, pad=1, labelbottom=layer == layers - 1, labelleft=head == 0)
                if layer == 0:
                    ax.set_title(f"head {head + 1}", fontsize=FONT + 1)
                if head == 0:
                    ax.set_ylabel(f"layer {layer + 1}", fontsize=FONT + 1)
        subfig.suptitle(name, fontsize=FONT + 2)
        subfig.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=FONT + 2)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI)
        tmp.replace(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {output}: {e.strerror or e}") from None
    return output


# ----------------------------------------------------------------------------- command


def pieces(sp, ids: Sequence[int]) -> list[str]:
    return [sp.id_to_piece(int(i)) for i in ids]


def _check_length(side: str, ids: Sequence[int]) -> None:
    if len(ids) > MAX_PLOT_TOKENS:
        raise ConfigError(f"{side} has {len(ids)} tokens; attention plots take at most {MAX_PLOT_TOKENS}")


def attention_command(args) -> int:
    image_format(args.output)  # a missing extra or a bad -o fails before the checkpoint is loaded
    source = clean_line(args.src)
    if not source:
        raise ConfigError("--src is empty")
    cfg, graphdef, params, tok, step, mesh = load_run(args.checkpoint, args.step, args.last)
    translator = Translator(cfg, graphdef, tok, mesh)
    src_ids = tok.encode_src([source])[0]
    _check_length("--src", src_ids)
    if args.tgt is not None:
        tgt_ids, how = tok.encode_tgt([clean_line(args.tgt)])[0], "given target"
    else:
        hyps = translator.translate_ids(params, [src_ids], settings_from(cfg, beam_size=1))
        tgt_ids, how = hyps[0][0][0], "greedy translation"
    _check_length("the target", tgt_ids)
    weights = translator.attention_weights(params, [src_ids], [tgt_ids])[0]
    src_labels = pieces(tok.src, src_ids)
    out_labels = pieces(tok.tgt, list(tgt_ids) + [EOS_ID])  # row t: the step that outputs piece t
    in_labels = ["<s>"] + out_labels[:-1]
    sections = [("cross-attention (rows: output pieces, columns: source pieces)", weights["cross"],
                 out_labels, src_labels)]
    if args.self_attention:
        sections += [("encoder self-attention (rows: queries, columns: keys)", weights["encoder"],
                      src_labels, src_labels),
                     ("decoder self-attention (rows: output pieces, columns: decoder inputs)", weights["decoder"],
                      out_labels, in_labels)]
    target = tok.decode_tgt([tgt_ids])[0]
    plot_attention(sections, args.output, f"{args.checkpoint} (step {step}), {how}:\n{source}  ->  {target}")
    layers, heads = weights["cross"].shape[:2]
    print(f"{how}: {target}", file=sys.stderr)
    print(f"wrote the attention of {layers} decoder layer(s) x {heads} head(s) to {args.output}", file=sys.stderr)
    return 0
