"""Configs that compose: a base plus overlays (``_base_``), the lookup of bundled configs, and
preprocessing taken from the timm model unless set."""

from pathlib import Path

import pytest

from flora.config import ConfigError, find_config, merge, read_yaml
from flora.training.config import load_experiment

REPO = Path(__file__).resolve().parents[2]


def test_an_overlay_states_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {x: 1, y: [1, 2], z: {deep: 1}}\nb: 2\n")
    (tmp_path / "mid.yaml").write_text("_base_: base.yaml\na: {y: [3], z: {other: 2}}\n")
    (tmp_path / "top.yaml").write_text("_base_: [mid.yaml]\nb: 5\nc: new\n")
    assert read_yaml(tmp_path / "top.yaml") == {
        "a": {"x": 1, "y": [3], "z": {"deep": 1, "other": 2}},  # mappings merge, lists are replaced
        "b": 5,
        "c": "new",
    }
    assert merge({"a": {"b": 1}}, {"a": None}) == {"a": None}


def test_bad_bases_are_clear(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ files form a cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="_base_ file not found: nowhere.yaml"):
        read_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("_base_: {x: 1}\n")
    with pytest.raises(ConfigError, match="must be a file name or a list"):
        read_yaml(tmp_path / "d.yaml")


def test_lookup_prefers_the_users_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = find_config("sharding_smoke.yaml")
    assert bundled == REPO / "config" / "sharding_smoke.yaml"
    assert find_config("config/sharding_smoke.yaml") == bundled  # the checkout's name works anywhere
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sharding_smoke.yaml").write_text("_base_: sharding.yaml\nseed: 7\n")
    mine = find_config("sharding_smoke.yaml")
    assert mine == Path("config") / "sharding_smoke.yaml" or mine.resolve() == (
        tmp_path / "config" / "sharding_smoke.yaml"
    )
    assert read_yaml("sharding_smoke.yaml")["seed"] == 7  # its base found among the bundled ones
    assert find_config("missing.yaml") is None


def test_smoke_configs_are_overlays_with_the_full_configs_values():
    for smoke in REPO.glob("config/*_smoke.yaml"):
        assert read_yaml_raw(smoke).get("_base_"), smoke.name
    full = load_experiment(REPO / "config" / "teacher_global.yaml")
    smoke = load_experiment(REPO / "config" / "teacher_global_smoke.yaml")
    inherited = (
        smoke.optim.weight_decay,
        smoke.optim.clip_grad,
        smoke.schedule.warmup_lr,
        smoke.train.label_smoothing,
    )
    assert inherited == (
        full.optim.weight_decay,
        full.optim.clip_grad,
        full.schedule.warmup_lr,
        full.train.label_smoothing,
    )
    assert (smoke.model.name, smoke.data.image_size, smoke.schedule.min_lr) == ("test_vit", 64, 1e-5)


def read_yaml_raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_normalisation_and_size_come_from_the_model_unless_set(tmp_path):
    base = {"data": {"shards": str(tmp_path)}, "model": {"name": "vit_base_patch16_224"}}
    vit = load_experiment(base)
    assert vit.data.augment.mean == [0.5, 0.5, 0.5] and vit.data.augment.crop_pct == 0.9
    assert vit.data.image_size == 224
    cnn = load_experiment({**base, "model": {"name": "mobilenetv2_050"}})
    assert cnn.data.augment.mean == [0.485, 0.456, 0.406] and cnn.data.augment.crop_pct == 0.875
    mine = load_experiment(base, ["data.augment.mean=[0.1,0.2,0.3]", "data.image_size=96"])
    assert mine.data.augment.mean == [0.1, 0.2, 0.3] and mine.data.image_size == 96
    assert mine.data.augment.std == [0.5, 0.5, 0.5]  # what is not set still comes from the model
