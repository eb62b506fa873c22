"""The data config: the YAML files we ship load; unknown keys and bad values fail naming the key."""

from pathlib import Path

import pytest

from flora.config import ConfigError
from flora.loaders import DataConfig, LoaderError, create_dataloaders, load_data_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["data.yaml", "data_smoke.yaml"])
def test_shipped_configs_load(name):
    cfg = load_data_config(REPO / "config" / name)
    assert cfg.shards and cfg.backend in ("dali", "torch")
    assert cfg.val_resize >= cfg.image_size


def test_other_sections_are_left_to_their_owners(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit}\ndata:\n  shards: /x\n  batch_size: 8\n  augment: {hflip: 0.0}\n")
    cfg = load_data_config(path, ["data.image_size=96"])
    assert (cfg.batch_size, cfg.image_size, cfg.augment.hflip) == (8, 96, 0.0)
    assert cfg.val_resize == round(96 / 0.875)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"shards": "/x", "batchsize": 8}, "unknown config key data.batchsize"),
        ({"shards": "/x", "augment": {"flip": 0.5}}, "unknown config key data.augment.flip"),
        ({"shards": "/x", "batch_size": 0}, "data.batch_size: expected >= 1, got 0"),
        ({"shards": "/x", "batch_size": "many"}, "data.batch_size: expected an integer"),
        ({"shards": "/x", "backend": "tf"}, "data.backend: expected one of ['dali', 'torch']"),
        ({"shards": "/x", "device": "tpu"}, "data.device: expected one of"),
        ({"shards": "/x", "augment": {"scale": [0.9, 0.1]}}, "augment.scale"),
        ({"shards": "/x", "augment": {"hue": 0.7}}, "augment.hue"),
        ({"shards": "/x", "augment": {"std": [0.2, 0.0, 0.2]}}, "std > 0"),
        ({"shards": "/x", "region_filter": []}, "empty list selects nothing"),
        ({"shards": "/x", "decoder": {"hw_decoder_load": 1.5}}, "decoder.hw_decoder_load: expected a share"),
        (
            {"shards": "/x", "decoder": {"host_memory_padding": -1}},
            "decoder.host_memory_padding: expected >= 0",
        ),
        ({"shards": "/x", "decoder": {"hw_load": 0.5}}, "unknown config key data.decoder.hw_load"),
        ({"shards": "/x", "decoder": {"preallocate_width_hint": 1.5}}, "expected an integer"),
        ({"shards": "/x", "prefetch": 0}, "data.prefetch: expected >= 1, got 0"),
        ({"shards": "/x", "label_space": "region"}, "needs exactly one region"),
        ({"shards": "/x", "train_remainder": "wrap"}, "data.train_remainder"),
        (
            {"shards": "/x", "verify_every": -1},
            "data.verify_every: expected epochs >= 0 (0: never re-check), got -1",
        ),
        ({"shards": "/x", "verify_every": "daily"}, "data.verify_every: expected an integer"),
        ({}, "data.shards: the shard root"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        load_data_config({"data": data})
    assert message in str(err.value)


def test_an_override_goes_through_the_same_checks():
    assert load_data_config({"data": {"shards": "/x"}}, ["data.verify_every=3"]).verify_every == 3
    with pytest.raises(ConfigError, match="data.verify_every: expected epochs >= 0 .*got -2"):
        load_data_config({"data": {"shards": "/x"}}, ["data.verify_every=-2"])


def test_missing_section_and_file(tmp_path):
    (tmp_path / "x.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="no 'data' section"):
        load_data_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_data_config(tmp_path / "missing.yaml")


def test_region_filter_forms():
    assert DataConfig(shards="/x").regions is None
    assert DataConfig(shards="/x", region_filter="all").regions is None
    assert DataConfig(shards="/x", region_filter="EU_SW").regions == ["EU_SW"]
    assert DataConfig(shards="/x", region_filter=["EU_SW", "EU_SE"]).regions == ["EU_SW", "EU_SE"]


def test_shard_root_problems_are_clear(tmp_path, shard_root):
    with pytest.raises(LoaderError, match="no manifest.json"):
        create_dataloaders({"data": {"shards": str(tmp_path), "device": "cpu"}})
    with pytest.raises(LoaderError, match="unknown region 'ATLANTIS'"):
        create_dataloaders(
            {"data": {"shards": str(shard_root), "device": "cpu", "region_filter": "ATLANTIS"}}
        )
    with pytest.raises(LoaderError, match="split 'holdout' has no shards"):
        create_dataloaders({"data": {"shards": str(shard_root), "device": "cpu", "val_split": "holdout"}})
    with pytest.raises(LoaderError, match="rank must be in"):
        create_dataloaders({"data": {"shards": str(shard_root), "device": "cpu"}}, rank=2, world_size=2)


def test_backends_are_a_registry():
    from flora.loaders.backends import BACKENDS, backend_names, loader_class, register_backend
    from flora.loaders.reference import ReferenceLoader

    assert backend_names() == ["dali", "torch"] and loader_class("torch") is ReferenceLoader
    register_backend("mine", "flora.loaders.reference:ReferenceLoader")
    try:
        assert load_data_config({"data": {"shards": "/x", "backend": "mine"}}).backend == "mine"
        assert loader_class("mine") is ReferenceLoader
    finally:
        BACKENDS.pop("mine")
    with pytest.raises(ConfigError, match="data.backend: expected one of"):
        load_data_config({"data": {"shards": "/x", "backend": "mine"}})
