"""Typed config loading: unknown keys, bad types and bad values name the key; overrides apply."""

import pytest

from flora.config import ConfigError, apply_overrides, load_config
from flora.sharding.config import CatalogConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_seeds_values():
    cfg = load_config(CatalogConfig)
    assert cfg.split.fractions == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert cfg.production_only is False


def test_bundled_configs_load():
    for name in ("config/catalog.yaml", "config/catalog_smoke.yaml"):
        cfg = load_config(CatalogConfig, name)
        assert cfg.regions == ["EU_SW"]


def test_unknown_key_is_an_error_naming_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"split\.sede"):
        load_config(CatalogConfig, write(tmp_path, "split:\n  sede: 3\n"))
    with pytest.raises(ConfigError, match="unknown config key productin_only"):
        load_config(CatalogConfig, write(tmp_path, "productin_only: true\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"split\.seed: expected an integer, got str 'abc'"):
        load_config(CatalogConfig, write(tmp_path, "split: {seed: abc}\n"))
    with pytest.raises(ConfigError, match="production_only: expected true or false"):
        load_config(CatalogConfig, write(tmp_path, "production_only: 1\n"))
    with pytest.raises(ConfigError, match="species_conflict: expected one of"):
        load_config(CatalogConfig, write(tmp_path, "species_conflict: vote\n"))


def test_fractions_must_sum_to_one(tmp_path):
    with pytest.raises(ConfigError, match="must sum to 1.0"):
        load_config(CatalogConfig, write(tmp_path, "split: {fractions: {train: 0.8, val: 0.1, test: 0.2}}\n"))
    with pytest.raises(ConfigError, match="exactly"):
        load_config(CatalogConfig, write(tmp_path, "split: {fractions: {train: 0.9, dev: 0.1}}\n"))


def test_overrides_are_dotted_and_typed(tmp_path):
    cfg = load_config(
        CatalogConfig, write(tmp_path, "split: {seed: 1}\n"), ["split.seed=7", "production_only=true"]
    )
    assert cfg.split.seed == 7 and cfg.production_only is True
    with pytest.raises(ConfigError, match=r"split\.sed"):
        load_config(CatalogConfig, None, ["split.sed=7"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["seed"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(CatalogConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(CatalogConfig, write(tmp_path, "split: [\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(CatalogConfig, write(tmp_path, "- 1\n"))
