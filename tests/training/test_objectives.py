"""The long-tail objectives: logit-adjusted cross-entropy and balanced softmax by hand, with label
smoothing and mixed labels, the class prior from the split's counts, the distillation objective's
task term, and tiny training runs."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flora.training import distill
from flora.training.checkpoint import Preprocessing, load_checkpoint, save_checkpoint
from flora.training.config import load_experiment
from flora.training.distill import Teacher, TeacherMix
from flora.training.loop import Trainer
from flora.training.objectives import (
    PRIOR_MIN_COUNT,
    Classification,
    build_objective,
    build_task_loss,
    class_prior,
)

from .conftest import experiment

COUNTS = [6, 3, 1]
PRIOR = [0.6, 0.3, 0.1]
LOGITS = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]


def _cfg(*overrides: str):
    return load_experiment({"data": {"shards": "s"}, "model": {"name": "test_vit"}}, list(overrides))


def _info(counts=COUNTS):
    return SimpleNamespace(class_counts=list(counts), num_classes=len(counts))


def _hand_ce(logits: list[float], target: list[float], offsets: list[float], smoothing: float) -> float:
    """``-sum_c t_c log softmax(logits + offsets)_c`` with ``t`` smoothed as ``t (1 - e) + e / C``."""
    z = [a + b for a, b in zip(logits, offsets, strict=True)]
    log_norm = math.log(sum(math.exp(v) for v in z))
    smoothed = [t * (1 - smoothing) + smoothing / len(z) for t in target]
    return -sum(t * (v - log_norm) for t, v in zip(smoothed, z, strict=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    ("kind", "tau"), [("logit_adjusted", 0.5), ("logit_adjusted", None), ("balanced_softmax", None)]
)
def test_long_tail_losses_by_hand(kind, tau, smoothing):
    overrides = [f"objective.kind={kind}", f"train.label_smoothing={smoothing}"]
    if tau is not None:
        overrides.append(f"objective.tau={tau}")
    task = build_task_loss(kind, _cfg(*overrides), _info())
    scale = 1.0 if tau is None else tau  # logit_adjusted's default tau and balanced softmax's are 1
    offsets = [scale * math.log(p) for p in PRIOR]
    labels = [2, 1]
    got = task(torch.tensor(LOGITS), {"label": torch.tensor(labels)})
    for row, label in enumerate(labels):
        one_hot = [float(c == label) for c in range(3)]
        assert got[row].item() == pytest.approx(_hand_ce(LOGITS[row], one_hot, offsets, smoothing), rel=1e-6)
    plain = build_task_loss("classification", _cfg(f"train.label_smoothing={smoothing}"), _info())
    assert plain.adjustment is None
    assert plain(torch.tensor(LOGITS), {"label": torch.tensor(labels)})[0].item() == pytest.approx(
        _hand_ce(LOGITS[0], [0.0, 0.0, 1.0], [0.0] * 3, smoothing), rel=1e-6
    )


def test_a_mixed_label_is_the_target_with_the_adjustment_and_smoothing():
    task = build_task_loss(
        "logit_adjusted",
        _cfg("objective.kind=logit_adjusted", "objective.tau=2.0", "train.label_smoothing=0.2"),
        _info(),
    )
    mixed = [[0.7, 0.0, 0.3], [0.0, 0.4, 0.6]]
    batch = {"label": torch.tensor([0, 1]), "mixed_label": torch.tensor(mixed)}
    got = task(torch.tensor(LOGITS), batch)
    offsets = [2.0 * math.log(p) for p in PRIOR]
    for row in range(2):
        assert got[row].item() == pytest.approx(_hand_ce(LOGITS[row], mixed[row], offsets, 0.2), rel=1e-6)


def test_the_prior_comes_from_the_class_counts_with_a_floor():
    assert class_prior(COUNTS).tolist() == pytest.approx(PRIOR)
    assert PRIOR_MIN_COUNT == 1
    prior = class_prior([4, 0, 1])  # a class without training samples counts as one
    assert prior.tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    task = build_task_loss("balanced_softmax", _cfg("objective.kind=balanced_softmax"), _info([4, 0, 1]))
    assert torch.isfinite(task.adjustment).all()
    assert torch.isfinite(task(torch.tensor(LOGITS), {"label": torch.tensor([1, 1])})).all()
    with pytest.raises(ValueError, match="class_counts"):
        class_prior([])
    with pytest.raises(ValueError, match="class_counts has 2 classes, the run 3"):
        build_task_loss("logit_adjusted", _cfg("objective.kind=logit_adjusted"), SimpleNamespace(
            class_counts=[1, 2], num_classes=3))  # fmt: skip


def test_sampling_that_changes_the_class_frequencies_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="flora.training.objectives")
    build_task_loss("logit_adjusted", _cfg("objective.kind=logit_adjusted"), _info())
    assert not caplog.records
    cfg = _cfg("objective.kind=logit_adjusted", "data.sampling.policy=class_balanced")
    build_task_loss("logit_adjusted", cfg, _info())
    assert "policy class_balanced" in caplog.text and "corrections add up" in caplog.text


def test_the_objectives_average_valid_rows_and_output_raw_logits():
    cfg = _cfg("objective.kind=logit_adjusted", "train.label_smoothing=0.0")
    objective = build_objective(cfg, _info(), torch.device("cpu"))
    assert isinstance(objective, Classification)
    logits = torch.tensor([*LOGITS, [-9.0, -9.0, 9.0]])
    batch = {"image": logits, "label": torch.tensor([2, 1, 0]), "valid": torch.tensor([True, True, False])}
    out = objective(nn.Identity(), batch)
    offsets = [math.log(p) for p in PRIOR]
    expected = (_hand_ce(LOGITS[0], [0, 0, 1], offsets, 0) + _hand_ce(LOGITS[1], [0, 1, 0], offsets, 0)) / 2
    assert (
        out["loss"].item() == pytest.approx(expected, rel=1e-6)
        and out["task_loss"].item() == out["loss"].item()
    )
    assert torch.equal(out["output"], logits)  # predictions stay the raw logits


class _Uniform(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 3)


@pytest.mark.parametrize("task", ["classification", "logit_adjusted", "balanced_softmax"])
def test_the_distill_objective_takes_each_task_term(task, monkeypatch):
    pre = Preprocessing(image_size=4, mean=[0.0] * 3, std=[1.0] * 3, crop_pct=1.0, val_resize=4)
    mapping = {"a": 0, "b": 1, "c": 2}
    mixer = TeacherMix(
        [Teacher(_Uniform(), mapping, pre, "t")], [1.0], mapping, 2.0, "per_class", [0.0] * 3, [1.0] * 3
    )
    monkeypatch.setattr(distill, "build_mixer", lambda cfg, info: mixer)  # no teacher checkpoint to load
    overrides = ["objective.kind=distill", "distill.teachers=[{checkpoint: t.pt}]", f"distill.task={task}",
                 "distill.alpha=0.25", "distill.temperature=2.0", "train.label_smoothing=0.1"]  # fmt: skip
    if task == "logit_adjusted":
        overrides.append("objective.tau=0.5")
    objective = build_objective(_cfg(*overrides), _info(), torch.device("cpu"))
    logits = torch.tensor(LOGITS)
    batch = {
        "image": torch.zeros(2, 3, 4, 4),
        "label": torch.tensor([2, 1]),
        "valid": torch.ones(2, dtype=bool),
    }
    out = objective(lambda images: logits, batch)
    scale = {"classification": 0.0, "logit_adjusted": 0.5, "balanced_softmax": 1.0}[task]
    offsets = [scale * math.log(p) for p in PRIOR]
    ce = [_hand_ce(LOGITS[r], [float(c == y) for c in range(3)], offsets, 0.1) for r, y in enumerate([2, 1])]
    assert out["task_loss"].item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    # the KD term compares the raw logits with the (uniform) teacher, whatever the task term
    kl = [-math.log(3) - torch.log_softmax(logits[r] / 2.0, 0).mean().item() for r in range(2)]
    assert out["kd_loss"].item() == pytest.approx(4.0 * sum(kl) / 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.25 * out["kd_loss"].item() + 0.75 * out["task_loss"].item())


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    ("objective", "mix"),
    [
        ({"kind": "logit_adjusted", "tau": 0.5}, {}),
        ({"kind": "balanced_softmax"}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}),
    ],
    ids=["logit_adjusted", "balanced_softmax+mix"],
)
def test_a_tiny_run_with_each_objective_is_deterministic(shard_root, tmp_path, objective, mix):
    runs = []
    for name in ("a", "b"):
        cfg = experiment(
            shard_root, tmp_path, name, objective=objective, train={"epochs": 1, "max_steps": 3, "mix": mix}
        )
        trainer = Trainer(load_experiment(cfg))
        summary = trainer.fit()
        assert summary["status"] == "finished" and summary["steps"] == 3
        assert math.isfinite(summary["last_epoch"]["train_loss"])
        runs.append(_weights(trainer))
    assert trainer.objective.task.adjustment is not None
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_a_checkpoint_from_before_the_long_tail_keys_resumes(shard_root, tmp_path):
    cfg = experiment(shard_root, tmp_path, train={"epochs": 1, "max_steps": 3})
    Trainer(load_experiment(cfg), stop_after=1).fit()
    path = tmp_path / "run" / "last_checkpoint.pt"
    old = load_checkpoint(path)
    assert old.config["objective"] == {"kind": "classification", "tau": None}
    old.config["objective"] = {"kind": "classification"}  # as a run checkpointed before objective.tau
    save_checkpoint(path, old)
    summary = Trainer(load_experiment(cfg), resume=True).fit()
    assert summary["status"] == "finished" and summary["steps"] == 3
