"""Run configs: TOML round trip, unknown keys and wrong types are errors, the shipped configs load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vae_priors.experiments import config as configs
from vae_priors.experiments.config import ConfigError, RunConfig

CONFIG_DIR = Path(configs.__file__).parent / "configs"


def test_dumps_then_from_dict_gives_the_same_config():
    original = RunConfig(seed=3, variants=["vae", "cvae"])
    original.model.hidden = [7, 5]
    original.svi.lr = 0.25
    import tomllib

    assert configs.from_dict(tomllib.loads(configs.dumps(original))) == original


def test_unknown_key_is_an_error_that_names_it_and_lists_the_known_ones(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[svi]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key svi\.learning_rate;.*known keys here: .*lr"):
        configs.load(path)


def test_unknown_top_level_table_is_an_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optimiser]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key optimiser;"):
        configs.load(path)


@pytest.mark.parametrize("text, message", [
    ("seed = \"zero\"", "seed must be int"),
    ("[model]\nhidden = 128", "model.hidden must be a list of int"),
    ("[svi]\nepochs = true", "svi.epochs must be int"),
    ("data = 3", "data must be a table"),
])
def test_wrong_types_are_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        configs.load(path)


@pytest.mark.parametrize("values, message", [
    ({"data": {"binarize": "yes"}}, "data.binarize = 'yes' is not allowed; choose one of 'none', 'static', 'dynamic'"),
    ({"data": {"quadrants": 4}}, "data.quadrants = 4 is not allowed"),
    ({"svi": {"batch_size": 0}}, "svi.batch_size must be > 0"),
    ({"model": {"hybrid_alpha": 1.5}}, r"model.hybrid_alpha must be in \[0, 1\]"),
    ({"svi": {"warmup_epochs": -1}}, "svi.warmup_epochs must be >= 0"),
    ({"model": {"exemplar_clusters": -1}}, "model.exemplar_clusters must be >= 0"),
    ({"model": {"exemplar_clusters": 8, "exemplar_cluster_draws": 0}}, "got clusters=8, cluster_draws=0, probe=0"),
    ({"model": {"exemplar_probe": 2}}, "probe > 0 needs clusters > 0"),
    ({"model": {"exemplar_nearest": -1}}, "model.exemplar_nearest must be >= 0"),
    ({"model": {"exemplar_nearest": 8, "exemplar_drift": "affine"}}, "needs model.exemplar_drift = 'none'"),
    ({"data": {"likelihood": "gaussian"}}, "data.likelihood = 'gaussian' with data.binarize = 'static' would fit a "
                                           "Gaussian to 0/1 pixels; set data.binarize = 'none'"),
])
def test_values_outside_their_choices_or_ranges_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        configs.from_dict(values)


def test_integers_are_accepted_where_floats_are_expected():
    assert configs.from_dict({"svi": {"lr": 1}}).svi.lr == 1.0


def test_invalid_toml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        configs.load(tmp_path / "missing.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[svi\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        configs.load(path)


def test_a_directory_and_a_file_that_is_not_utf8_get_their_own_messages(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass the path of a .toml file"):
        configs.load(tmp_path)
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\xe9\nseed = 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml is not UTF-8 text"):
        configs.load(path)


@pytest.mark.parametrize("values, message", [
    ({"svi": {"lr": math.inf}}, "svi.lr must be a finite number > 0"),
    ({"svi": {"lr": math.nan}}, "svi.lr must be > 0"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_an_infinite_learning_rate_and_a_negative_seed_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        configs.from_dict(values)


def test_infinite_clip_norm_means_no_clipping_and_stays_allowed():
    assert configs.from_dict({"svi": {"clip_norm": math.inf}}).svi.clip_norm == math.inf


def test_quickstart_config_file_equals_the_defaults():
    assert configs.load(CONFIG_DIR / "digits-quickstart.toml") == RunConfig()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(configs.load(path), RunConfig)
