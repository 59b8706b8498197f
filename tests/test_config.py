"""Config loading: typed values, dotted overrides, one-line errors with exit codes."""

import pytest

from conftest import ROOT, cli, cli_here
from transformer_mt import config as config_lib
from transformer_mt.config import ConfigError


def test_shipped_configs_load_and_match_paper_sizes():
    for name in ("tiny", "multi30k_en_de", "multi30k_en_fr", "multi30k_en_de_d256", "wmt14_en_de_base", "wmt14_en_de_big"):
        config_lib.load(ROOT / "configs" / f"{name}.yaml")
    base = config_lib.load(ROOT / "configs" / "wmt14_en_de_base.yaml").model
    big = config_lib.load(ROOT / "configs" / "wmt14_en_de_big.yaml").model
    assert (base.d_model, base.num_heads, base.ffn_dim, base.num_encoder_layers) == (512, 8, 2048, 6)
    assert (big.d_model, big.num_heads, big.ffn_dim, big.num_decoder_layers) == (1024, 16, 4096, 6)


def test_overrides_are_typed():
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml", ["model.num_heads=2", "train.learning_rate=1e-3",
                                                           "data.bucket_lengths=[8, 32]"])
    assert cfg.model.num_heads == 2 and cfg.train.learning_rate == 1e-3
    assert cfg.data.bucket_lengths == (8, 32)


@pytest.mark.parametrize("override, fragment", [
    ("model.num_layerz=4", "unknown config key 'model.num_layerz'"),
    ("modle.d_model=4", "unknown config key 'modle'"),
    ("model.d_model=big", "config key 'model.d_model': expected an integer"),
    ("model.pre_norm=1", "config key 'model.pre_norm': expected true/false"),
    ("data.train_files=x.txt", "config key 'data.train_files': expected a list"),
    ("model.positional=learned", "config key 'model.positional'"),
    ("nodot=3", "must be section.key"),
    ("data.pack_lengths=[16]", "data.pack_lengths: the longest (16) must be at least data.max_len (32)"),
    ("data.pack_lengths=[32, 16]", "data.pack_lengths must be an increasing list"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        config_lib.load(ROOT / "configs" / "tiny.yaml", [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.d_modle'"):
        config_lib.load(path)


def test_cli_config_errors_are_one_line_with_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: many\n")
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--config", str(bad)], "config key 'train.max_steps': expected an integer"),
        (["--config", "configs/tiny.yaml", "--set", "model.heads=2"], "unknown config key 'model.heads'"),
    ]
    for k, (args, fragment) in enumerate(cases):
        # The first through the real entry point (a subprocess), the rest in this process.
        result = (cli if k == 0 else cli_here)("train", *args, "--workdir", str(tmp_path / "run"))
        err = result.stderr.decode().strip()
        assert result.returncode == 2, err
        assert fragment in err
        assert len(err.splitlines()) == 1, err
        assert "Traceback" not in err


def test_train_py_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--config", "--workdir", "--set", "--resume"):
        assert flag in out.stdout
