from pathlib import Path

import pytest

from flora.config import ConfigError
from flora.training.config import load_experiment, with_added_keys

REPO = Path(__file__).resolve().parents[2]

BASE = {"data": {"shards": "s"}}
DISTILL = ["objective.kind=distill", "distill.teachers=[{checkpoint: t.pt}]"]


#: Each shipped experiment's label term: the full configs' long-tail choice; the smoke ones keep plain
#: cross-entropy (the demo's figures).
LABEL_TERMS = {
    "teacher_global": ("logit_adjusted", 1.0),
    "teacher_regional": ("logit_adjusted", 1.0),
    "student": ("logit_adjusted", 1.0),
    "teacher_global_smoke": ("classification", None),
    "teacher_regional_smoke": ("classification", None),
    "student_smoke": ("classification", None),
}


@pytest.mark.parametrize("name", sorted(LABEL_TERMS))
def test_shipped_configs_load(name):
    cfg = load_experiment(REPO / "config" / f"{name}.yaml")
    task = cfg.distill.task if cfg.objective.kind == "distill" else cfg.objective.kind
    assert (task, cfg.objective.tau) == LABEL_TERMS[name]
    assert cfg.objective.kind == ("distill" if name.startswith("student") else task)
    assert cfg.data.sampling.policy == "uniform" and not cfg.train.mix.enabled
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
        (["objective.tau=1.0"], "objective.tau: only logit_adjusted uses it"),
        (["objective.kind=balanced_softmax", "objective.tau=0.5"], "objective.tau: only logit_adjusted"),
        ([*DISTILL, "objective.tau=1.0"], "got 1.0 with distill.task: classification"),
        (["objective.kind=logit_adjusted", "objective.tau=-1"], "objective.tau: expected >= 0"),
        ([*DISTILL, "distill.task=focal"], "distill.task"),
        (["train.mix.prob=1.5"], "train.mix.prob"),
        (["train.mix.mixup_alpha=-0.2"], "train.mix.mixup_alpha"),
        (["train.mix.alpha=0.2"], "train.mix.alpha"),
        (
            [*DISTILL, "distill.soft_labels=cached", "train.mix.cutmix_alpha=1"],
            "train.mix: mixup/cutmix need distill.soft_labels: online",
        ),
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

    assert {"classification", "logit_adjusted", "balanced_softmax", "distill"} <= set(objective_names())
    base = {"data": {"shards": str(tmp_path)}, "model": {"name": "test_vit"}}
    with pytest.raises(
        ConfigError,
        match=r"objective.kind: expected one of \['balanced_softmax', 'classification', 'distill'",
    ):
        load_experiment({**base, "objective": {"kind": "contrastive"}})

    @register_objective("contrastive")
    def _build(cfg, info, device, **context):  # a user's own objective, registered by name
        return None

    try:
        assert load_experiment({**base, "objective": {"kind": "contrastive"}}).objective.kind == "contrastive"
    finally:
        OBJECTIVES.pop("contrastive")


def test_long_tail_settings_load():
    cfg = load_experiment(
        BASE, ["objective.kind=logit_adjusted", "objective.tau=0.5", "train.mix.mixup_alpha=0.2"]
    )
    assert (cfg.objective.kind, cfg.objective.tau, cfg.train.mix.enabled) == ("logit_adjusted", 0.5, True)
    assert not load_experiment(BASE).train.mix.enabled  # mixing is off by default
    student = load_experiment(BASE, [*DISTILL, "distill.task=logit_adjusted", "objective.tau=2"])
    assert (student.distill.task, student.objective.tau) == ("logit_adjusted", 2.0)
    assert (
        load_experiment(BASE, [*DISTILL, "distill.task=balanced_softmax"]).distill.task == "balanced_softmax"
    )


def test_a_checkpoints_config_gains_the_keys_added_since_with_their_old_behaviour():
    assert with_added_keys("objective", {"kind": "classification"}) == {"kind": "classification", "tau": None}
    assert with_added_keys("distill", {"alpha": 0.7})["task"] == "classification"
    assert with_added_keys("objective", {"kind": "logit_adjusted", "tau": 0.5})["tau"] == 0.5
    assert (
        with_added_keys("model", {"name": "x"}) == {"name": "x"} and with_added_keys("distill", None) is None
    )
