from pathlib import Path

import pytest

from flora.config import ConfigError
from flora.training.config import load_experiment

REPO = Path(__file__).resolve().parents[2]

BASE = {"data": {"shards": "s"}}


@pytest.mark.parametrize(
    "name", ["teacher_global", "teacher_regional", "teacher_global_smoke", "teacher_regional_smoke"]
)
def test_shipped_configs_load(name):
    cfg = load_experiment(REPO / "config" / f"{name}.yaml")
    assert cfg.objective.kind == "classification"
    if name == "teacher_global":
        assert (cfg.model.name, cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (
            "vit_base_patch16_224",
            1e-5,
            64,
            15,
        )
    if name == "teacher_regional":
        assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (5e-6, 32, 20)
        assert cfg.model.init_from and cfg.data.label_space == "region" and cfg.data.region_filter == "EU_SW"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["train.amp=fp8"], "train.amp"),
        (["train.ema.decay=1.5"], "train.ema.decay"),
        (["optim.lr=-1"], "optim.lr"),
        (["model.pretrained_path=w.safetensors"], "model.pretrained_path"),
        (["objective.kind=distill"], "distill"),
        (["run.name=a/b"], "run.name"),
        (["data.image_size=0"], "data.image_size"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_experiment(BASE, overrides)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown section"):
        load_experiment({**BASE, "trian": {"epochs": 1}})


def test_lr_is_scaled_to_the_global_batch_in_one_place():
    cfg = load_experiment(
        BASE, ["optim.lr=1e-3", "optim.lr_base_batch=256", "data.batch_size=64", "train.grad_accum=2"]
    )
    assert cfg.effective_lr(world_size=4) == pytest.approx(2e-3)
    assert load_experiment(BASE, ["optim.lr=1e-3"]).effective_lr(8) == 1e-3


def test_objective_kind_is_checked_against_the_registry(tmp_path):
    from flora.training.objectives import OBJECTIVES, objective_names, register_objective

    assert {"classification", "distill"} <= set(objective_names())
    base = {"data": {"shards": str(tmp_path)}, "model": {"name": "test_vit"}}
    with pytest.raises(ConfigError, match=r"objective.kind: expected one of \['classification', 'distill'"):
        load_experiment({**base, "objective": {"kind": "contrastive"}})

    @register_objective("contrastive")
    def _build(cfg, info, device, **context):  # a user's own objective, registered by name
        return None

    try:
        assert load_experiment({**base, "objective": {"kind": "contrastive"}}).objective.kind == "contrastive"
    finally:
        OBJECTIVES.pop("contrastive")
