"""`attention` (heatmaps of the teacher-forced attention weights) and `translate --alignment`."""

import sys

import numpy as np
import pytest

from conftest import cli, cli_here
from transformer_mt.alignment import piece_words, word_alignment
from transformer_mt.attention import plot_attention
from transformer_mt.teacher_forcing import compiled_attention, teacher_forced_weights
from transformer_mt.translate import format_hypotheses
from transformer_mt.tokenizer import BOS_ID, PAD_ID

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAIRS = [
    ("Two dogs play in the snow .", "Zwei Hunde spielen im Schnee ."),
    ("A dog .", "Ein Hund ."),
    ("A man is riding a bike .", "Ein Mann fährt Fahrrad ."),
]


@pytest.fixture(scope="module")
def loaded(loaded_run):
    return loaded_run


def test_weights_are_distributions_that_skip_padding(loaded):
    cfg, graphdef, params, tok, mesh = loaded
    src_ids = tok.encode_src([s for s, _ in PAIRS])
    tgt_ids = tok.encode_tgt([t for _, t in PAIRS])
    length = 16  # the FAST bucket: every pair here is shorter, so each row has padding
    src = np.full((4, length), PAD_ID, np.int32)
    tgt_in = np.full((4, length), PAD_ID, np.int32)
    for r, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[r, : len(s)], tgt_in[r, : len(t) + 1] = s, [BOS_ID] + t
    w = {k: np.asarray(v) for k, v in compiled_attention(graphdef)(params, src, tgt_in).items()}
    real = src != PAD_ID  # [B, S]; row 3 is all padding
    for name in ("encoder", "cross"):  # [layers, B, H, queries, S]
        np.testing.assert_allclose(w[name].sum(-1), 1.0, atol=1e-5)
        on_padding = w[name][:, :3] * ~real[:3, None, None, :]
        assert np.all(on_padding == 0.0), f"{name} attention puts weight on source padding"
    assert np.all(np.triu(w["decoder"][..., :, :], k=1) == 0.0)  # no step sees a later target token
    np.testing.assert_allclose(w["decoder"].sum(-1), 1.0, atol=1e-5)

    # Per pair with the padding cut away: the same weights as one sentence batched alone.
    together = teacher_forced_weights(graphdef, params, mesh, (16,), 512, src_ids, tgt_ids)
    alone = teacher_forced_weights(graphdef, params, mesh, (16,), 512, src_ids[1:2], tgt_ids[1:2])[0]
    s, t = len(src_ids[1]), len(tgt_ids[1]) + 1
    assert together[1]["cross"].shape == (cfg.model.num_decoder_layers, cfg.model.num_heads, t, s)
    for name in ("encoder", "decoder", "cross"):
        np.testing.assert_allclose(together[1][name], alone[name], atol=1e-5)
    # The alignment program returns the last layer's cross-attention averaged over heads.
    summary = teacher_forced_weights(graphdef, params, mesh, (16,), 512, src_ids, tgt_ids, alignment_only=True)
    for full, mean in zip(together, summary):
        np.testing.assert_allclose(mean, full["cross"][-1].mean(0), atol=1e-6)


def test_returning_weights_leaves_the_outputs_unchanged(loaded):
    cfg, graphdef, params, tok, mesh = loaded
    from flax import nnx

    model = nnx.merge(graphdef, params)
    src = np.asarray(tok.encode_src([PAIRS[0][0]]), np.int32)
    tgt_in = np.asarray([[BOS_ID] + tok.encode_tgt([PAIRS[0][1]])[0]], np.int32)
    encoded, mask = model.encode(src)
    encoded_w, mask_w, weights = model.encode(src, return_weights=True)
    assert len(weights) == cfg.model.num_encoder_layers
    np.testing.assert_array_equal(encoded_w, encoded)
    logits, dec = model.decode(tgt_in, encoded, mask, return_weights=True)
    np.testing.assert_array_equal(logits, model.decode(tgt_in, encoded, mask))
    assert dec["cross"][0].shape == (1, cfg.model.num_heads, tgt_in.shape[1], src.shape[1])


def colored_runs(pixels: np.ndarray) -> int:
    """Runs of at least 3 saturated pixels (viridis panels and colour bar; text and axes are grey)."""
    colored = (pixels[:, :3].max(axis=1) - pixels[:, :3].min(axis=1)) > 0.15
    edges = np.flatnonzero(np.diff(np.concatenate([[0], colored.astype(int), [0]])))
    return int(np.sum(edges[1::2] - edges[::2] >= 3))


def grid_of(path) -> tuple[int, int, int, int]:
    """(panel columns + colour bar, panel rows, width, height) read back from the image: the
    pixel row and column that cross the most coloured pixels pass through a row / column of panels."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    colored = (image[..., :3].max(axis=-1) - image[..., :3].min(axis=-1)) > 0.15
    y = int(np.argmax(colored.sum(axis=1)))
    per_column = colored.sum(axis=0)
    x = int(np.argmax(per_column >= per_column.max() / 2)) + 3  # inside the first column of panels
    return colored_runs(image[y]), colored_runs(image[:, x]), image.shape[1], image.shape[0]


def test_png_grid_fits_layers_and_heads(tmp_path):
    rng = np.random.default_rng(0)
    src, tgt = ["▁A", "▁dog", "▁runs", "▁.", "</s>"], ["▁Ein", "▁Hund", "▁läuft", "▁.", "</s>"]
    sizes = {}
    for layers, heads in ((1, 2), (1, 4), (3, 2)):
        w = rng.dirichlet(np.ones(len(src)), size=(layers, heads, len(tgt)))
        out = plot_attention([("cross-attention", w, tgt, src)], tmp_path / f"{layers}x{heads}.png")
        assert out.read_bytes().startswith(PNG_MAGIC)
        columns, rows, width, height = grid_of(out)
        assert (columns, rows) == (heads + 1, layers), (layers, heads)
        sizes[layers, heads] = width, height
    assert sizes[1, 4][0] > 1.5 * sizes[1, 2][0]  # more heads: a wider image, as tall
    assert sizes[1, 4][1] == sizes[1, 2][1]
    assert sizes[3, 2][1] > 2 * sizes[1, 2][1]  # more layers: a taller image, as wide
    assert sizes[3, 2][0] == sizes[1, 2][0]


def test_attention_command_draws_a_real_run(trained_run, loaded, tmp_path):
    cfg = loaded[0]
    out = tmp_path / "attn.png"
    r = cli("attention", "--checkpoint", str(trained_run), "--src", "A dog runs .", "-o", str(out))  # the entry point
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "greedy translation: " in r.stderr.decode()
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    columns, rows, width, height = grid_of(out)
    assert (columns, rows) == (cfg.model.num_heads + 1, cfg.model.num_decoder_layers)
    # With a given target the panels' size no longer depends on the model's translation.
    pair = ["--checkpoint", str(trained_run), "--src", "A dog runs .", "--tgt", "Ein Hund rennt ."]
    cross, both = tmp_path / "cross.png", tmp_path / "self.png"
    assert cli_here("attention", *pair, "-o", str(cross)).returncode == 0
    r = cli_here("attention", *pair, "--self", "-o", str(both))
    assert r.returncode == 0, r.stderr.decode()
    columns, rows, _, self_height = grid_of(both)
    cross_height = grid_of(cross)[3]
    assert columns == cfg.model.num_heads + 1 and self_height > 2 * cross_height  # three sections of panels


def test_attention_errors_are_one_line(trained_run, tmp_path, monkeypatch):
    cases = [
        (["--src", "  "], "--src is empty"),
        (["--src", "A dog .", "-o", str(tmp_path / "a.xyz")], "unknown image format"),
        (["--src", " ".join(["dog"] * 120)], "attention plots take at most"),
    ]
    for args, fragment in cases:
        r = cli_here("attention", "--checkpoint", str(trained_run), *args)
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and fragment in err, err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    r = cli_here("attention", "--checkpoint", str(trained_run), "--src", "A dog .", "-o", str(tmp_path / "a.png"))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "transformer_mt[plot]" in err, err
    assert not (tmp_path / "a.png").exists()


# ----------------------------------------------------------------------------- alignment


def test_piece_words_number_words_as_split_does():
    assert piece_words(["▁Ein", "▁H", "und", "▁", "."]) == [0, 1, 1, 2, 2]  # a lone ▁ starts the next word
    assert piece_words(["a", "b", "▁c"]) == [0, 0, 1]  # no ▁ before the first piece
    assert piece_words(["▁x", "▁"]) == [0, -1]  # nothing after a trailing ▁
    assert piece_words([]) == []


def test_word_alignment_sums_source_pieces_and_averages_target_pieces():
    # Source words: "dog" = pieces 0, 1; "runs" = piece 2. Column 3 is EOS, row 3 is EOS's step.
    w = np.array([[0.3, 0.3, 0.4, 0.0],   # target word 0: per piece "runs" leads, per word "dog" (0.6)
                  [0.9, 0.0, 0.1, 0.0],   # target word 1, first piece: "dog"
                  [0.0, 0.4, 0.6, 0.0],   # ... second piece: "runs"; the mean says "dog" (0.65 vs 0.35)
                  [0.0, 0.0, 0.0, 1.0]])
    assert word_alignment(w, [0, 0, 1], [0, 1, 1]) == [(0, 0), (0, 1)]
    assert word_alignment(w, [], [0]) == [] and word_alignment(w, [0], []) == []


def test_format_appends_the_alignment_to_every_line():
    assert format_hypotheses(3, [("Ein Hund", -1.0)], 1, ["0-0 1-1"]) == ["Ein Hund ||| 0-0 1-1"]
    assert format_hypotheses(3, [("a b", -1.0), ("c", -2.5)], 2, ["0-0 1-1", "0-0"]) == [
        "3 ||| a b ||| -1.0000 ||| 0-0 1-1", "3 ||| c ||| -2.5000 ||| 0-0"]
    assert format_hypotheses(3, [("Ein Hund", -1.0)], 1) == ["Ein Hund"]


def test_translate_alignment_pairs_are_within_the_words(trained_run, tmp_path):
    sources = ["Two dogs play in the snow .", "", "A man   is riding a bike .", "A dog 🐕 runs ...",
               "A woman in a red dress is walking down the street with her small child and a very large dog ."]
    src = tmp_path / "src.en"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    r = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(src), "--alignment", "--beam", "1",
                 "--no-progress")
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode("utf-8").split("\n")[:-1]
    assert len(lines) == len(sources)
    plain = cli_here("translate", "--checkpoint", str(trained_run), "-i", str(src), "--beam", "1", "--no-progress")
    for line, source, translation in zip(lines, sources, plain.stdout.decode("utf-8").split("\n")):
        text, alignment = line.rsplit(" ||| ", 1)
        assert text == translation  # the alignment is only appended
        pairs = [tuple(map(int, p.split("-"))) for p in alignment.split()]
        n_src, n_out = len(source.split()), len(text.split())
        assert all(0 <= i < n_src and 0 <= j < n_out for i, j in pairs), (line, source)
        if n_src and n_out:
            assert [j for _, j in pairs] == list(range(n_out))  # one source word per output word, in order
        else:
            assert pairs == []
