from pathlib import Path

import pytest

from recray.config import load_config
from recray.errors import ConfigError
from recray.methods import check_config


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  n_train: 100\n  noun: book\n")
    cfg = load_config(path, ["data.min_interactions=5", "data.split=[0.7, 0.2, 0.1]"])
    assert cfg.data.n_train == 100 and cfg.data.noun == "book"
    assert cfg.data.min_interactions == 5 and cfg.data.split == (0.7, 0.2, 0.1)


def test_repo_default_config_loads():
    cfg = load_config("configs/ml100k.yaml")
    assert cfg.data.format == "movielens" and cfg.data.input is None


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=str)
def test_every_shipped_config_is_a_valid_run(path):
    check_config(load_config(path))


@pytest.mark.parametrize("override, key", [
    (["data.min_interaction=5"], "data.min_interaction"),      # typo
    (["datta.seed=1"], "datta"),
    (["data.n_train=many"], "data.n_train"),                   # wrong type
    (["data.n_train=0"], "data.n_train"),                      # out of range
    (["data.format=csv"], "data.format"),
])
def test_bad_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_split_must_sum_to_one():
    with pytest.raises(ConfigError, match="data.split"):
        load_config(None, ["data.split=[0.5, 0.1, 0.1]"])


def test_override_needs_equals_sign():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["data.seed"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
