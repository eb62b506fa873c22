"""Distillation: the loss by hand, frozen teachers, label spaces aligned by species, cached = online soft
labels for the same fixed view, and a smoke student that learns from two test_vit teachers."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from flora.config import ConfigError
from flora.loaders import create_dataloaders
from flora.loaders.factory import make_loader
from flora.training.checkpoint import Preprocessing
from flora.training.config import DistillConfig, load_experiment
from flora.training.distill import Distillation, Teacher, TeacherMix, build_mixer, kd_terms
from flora.training.loop import Trainer
from flora.training.objectives import TaskLoss
from flora.training.report import compare, markdown
from flora.training.soft_labels import SoftLabels, ensure_cache

from .conftest import experiment

PRE = Preprocessing(image_size=8, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], crop_pct=1.0, val_resize=8)


class Fixed(nn.Module):
    """A 'network' answering the same logits for every image (and remembering its last input)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.seen = x
        return self.logits.expand(x.shape[0], -1) * self.scale


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[0.75, 0.25]])
    label, valid = torch.tensor([0]), torch.tensor([True])
    t, a = 2.0, 0.7
    p = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # softmax(s / T)
    kl = 0.75 * math.log(0.75 / p[0]) + 0.25 * math.log(0.25 / p[1])
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))
    task = TaskLoss()(s, {"label": label})
    out = kd_terms(s, target, task, valid, t, a)
    assert out["kd_loss"].item() == pytest.approx(t * t * kl)
    assert out["task_loss"].item() == pytest.approx(ce)
    assert out["loss"].item() == pytest.approx(a * t * t * kl + (1 - a) * ce)
    assert kd_terms(s, target, task, valid, t, 1.0)["loss"].item() == pytest.approx(t * t * kl)
    assert kd_terms(s, target, task, valid, t, 0.0)["loss"].item() == pytest.approx(ce)
    # averaged over the batch (not batch x classes); invalid (padding) rows carry nothing
    many = kd_terms(
        torch.cat([s, s, torch.zeros(1, 2)]),
        torch.cat([target, target, torch.tensor([[0.0, 1.0]])]),
        torch.cat([task, task, torch.tensor([5.0])]),
        torch.tensor([True, True, False]),
        t,
        a,
    )
    assert many["loss"].item() == pytest.approx(out["loss"].item())


def test_teacher_is_frozen_and_sees_the_same_view_in_its_own_preprocessing():
    net = Fixed([[0.0, 1.0]])
    preprocessing = Preprocessing(image_size=4, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, val_resize=4)
    teacher = Teacher(net, {"a": 0, "b": 1}, preprocessing, "t")
    mixer = TeacherMix([teacher], [1.0], {"a": 0, "b": 1}, 1.0, "per_class", [0.2] * 3, [0.1] * 3)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    objective = Distillation(DistillConfig(teachers=[{"checkpoint": "x"}]), mixer).train()
    images = torch.rand(2, 3, 8, 8)
    out = objective(
        student,
        {
            "image": images,
            "label": torch.tensor([0, 1]),
            "valid": torch.ones(2, dtype=bool),
            "index": torch.tensor([0, 1]),
        },
    )
    out["loss"].backward()
    assert net.scale.grad is None and not net.scale.requires_grad and not net.training
    assert all(p.grad is not None for p in student.parameters())
    raw = images * 0.1 + 0.2  # the student's normalisation undone ...
    expected = nn.functional.interpolate((raw - 0.5) / 0.25, size=(4, 4), mode="bilinear", antialias=True)
    assert torch.allclose(net.seen, expected, atol=1e-5)  # ... the teacher's applied, at its size


def _mix(mixing):
    # student: d, c, b, a. Teacher A knows a, b, c; teacher B knows b, c, d and x (unknown to the student).
    a = Teacher(Fixed([[math.log(0.5), math.log(0.3), math.log(0.2)]]), {"a": 0, "b": 1, "c": 2}, PRE, "A")
    b = Teacher(
        Fixed([[math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]]),
        {"b": 0, "c": 1, "d": 2, "x": 3},
        PRE,
        "B",
    )
    return TeacherMix([a, b], [3.0, 1.0], {"d": 0, "c": 1, "b": 2, "a": 3}, 1.0, mixing, [0.0] * 3, [1.0] * 3)


def test_label_spaces_are_aligned_by_species_name():
    mixer = _mix("per_class")
    assert mixer.coverage() == {"A": 3, "B": 3}
    images = torch.zeros(1, 3, 8, 8)
    # B restricted to the student's species (x dropped): b .1, c .2, d .3 -> renormalised by .6
    qa = {"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.0}
    qb = {"a": 0.0, "b": 0.1 / 0.6, "c": 0.2 / 0.6, "d": 0.3 / 0.6}
    # per class: average over the teachers that know the species, weights 0.75 / 0.25 renormalised
    raw = {
        "a": qa["a"],
        "d": qb["d"],
        "b": 0.75 * qa["b"] + 0.25 * qb["b"],
        "c": 0.75 * qa["c"] + 0.25 * qb["c"],
    }
    total = sum(raw.values())
    got = mixer(images, torch.tensor([0]))[0]
    for name, col in {"d": 0, "c": 1, "b": 2, "a": 3}.items():
        assert got[col].item() == pytest.approx(raw[name] / total, abs=1e-6), name
    # per sample: a label only A knows -> A alone; a label both know -> 0.75 A + 0.25 B
    per_sample = _mix("per_sample")
    only_a = per_sample(images, torch.tensor([3]))[0]
    assert only_a.tolist() == pytest.approx([qa["d"], qa["c"], qa["b"], qa["a"]], abs=1e-6)
    both = per_sample(images, torch.tensor([1]))[0]
    assert both.tolist() == pytest.approx([0.75 * qa[n] + 0.25 * qb[n] for n in "dcba"], abs=1e-6)


def _student_cfg(shard_root, teachers, root, name, **distill):
    cfg = experiment(
        shard_root,
        root,
        name,
        model={"name": "test_efficientnet"},
        train={"epochs": 3},
        objective={"kind": "distill"},
        optim={"lr": 3e-3},
    )
    cfg["distill"] = {
        "teachers": [
            {"name": "global", "checkpoint": str(teachers["global"]), "weight": 0.5},
            {"name": "regional", "checkpoint": str(teachers["regional"]), "weight": 0.5},
        ],
        "temperature": 3.0,
        "alpha": 0.7,
        "cache": {"dir": str(root / "soft"), "top_k": 20},
        **distill,
    }
    return cfg


def test_cached_soft_labels_equal_online_ones_for_the_same_fixed_view(shard_root, teachers, tmp_path):
    cfg = load_experiment(
        _student_cfg(
            shard_root,
            teachers,
            tmp_path,
            "s",
            soft_labels="cached",
            cache={"dir": str(tmp_path / "soft"), "top_k": 1000},
        )
    )
    train, _, info = create_dataloaders(cfg.data)
    mixer = build_mixer(cfg.distill, info)
    cache = ensure_cache(cfg, mixer, train.index, torch.device("cpu"))
    assert (cache.path / "meta.json").is_file() and cache.computed == len(train.index)
    files = sorted((cache.path / "shards").glob("*.npz"))
    assert len(files) == len(train.index.shards), "one file per shard"
    fixed_view = make_loader(cfg.data, cfg.data.train_split, False, 0, 1, torch.device("cpu"))
    checked = 0
    for batch in fixed_view:
        online = mixer(batch["image"], batch["label"])
        cached = cache.lookup(batch["index"], info.num_classes)
        assert torch.allclose(online, cached, atol=1e-6)
        checked += len(batch["index"])
    assert checked == len(train.index)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = ensure_cache(cfg, mixer, train.index, torch.device("cpu"))  # found, not rebuilt
    assert again.path == cache.path and again.computed == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_stored_views_hold_the_teachers_on_the_very_view_the_student_replays(shard_root, teachers, tmp_path):
    """``distill.cache.views: 2``: per sample two views' parameters and the teachers' mixture of each;
    the training loader, set to replay them, hands out exactly those pixels, so the cached targets equal
    the teachers' online mixture of each batch (top-k >= classes), whichever view an epoch uses."""
    cache_cfg = {"dir": str(tmp_path / "soft"), "top_k": 1000, "views": 2}
    cfg = load_experiment(
        _student_cfg(shard_root, teachers, tmp_path, "s", soft_labels="cached", cache=cache_cfg)
    )
    train, _, info = create_dataloaders(cfg.data)
    mixer = build_mixer(cfg.distill, info)
    cache = ensure_cache(cfg, mixer, train.index, torch.device("cpu"))
    assert cache.views == 2 and cache.computed == len(train.index)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert "2 stored augmented views" in meta["view"]
    with np.load(sorted((cache.path / "shards").glob("*.npz"))[0]) as f:
        n = len(f["keys"])
        assert f["classes"].shape[:2] == (n, 2) and f["views"].shape == (n, 2, 10)
    flat = _student_cfg(
        shard_root, teachers, tmp_path, "s", soft_labels="cached", cache={**cache_cfg, "views": 0}
    )
    assert ensure_cache(load_experiment(flat), mixer, train.index, torch.device("cpu")).path != cache.path
    train.set_replay(cache.replay(train.index.keys, cfg.data.seed))
    views_read: dict[int, list[int]] = {}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        for batch in train:
            online = mixer(batch["image"], batch["label"])
            cached = cache.lookup(batch["index"], info.num_classes, batch["view"])
            assert torch.allclose(online, cached, atol=1e-5)
            for i, v in zip(batch["index"].tolist(), batch["view"].tolist(), strict=True):
                views_read.setdefault(i, []).append(v)
    twice = [sorted(v) for v in views_read.values() if len(v) == 2]  # (drop leaves an epoch's tail out)
    assert len(twice) > 0.8 * len(train.index) and all(v == [0, 1] for v in twice)  # both views, in turn
    with pytest.raises(RuntimeError, match="does not say which"):
        cache.lookup(batch["index"], info.num_classes)
    again = ensure_cache(cfg, mixer, train.index, torch.device("cpu"))
    assert again.computed == 0 and torch.equal(again.probs, cache.probs)


def test_smoke_student_learns_online_and_cached_and_the_report(shard_root, teachers, tmp_path):
    runs = {}
    for mode in ("online", "cached"):
        trainer = Trainer(
            load_experiment(_student_cfg(shard_root, teachers, tmp_path, mode, soft_labels=mode))
        )
        summary = trainer.fit()
        history = json.loads((tmp_path / mode / "metrics.json").read_text())["epochs"]
        assert history[-1]["train_loss"] < history[0]["train_loss"]
        assert history[-1]["train_kd_loss"] < history[0]["train_kd_loss"]
        assert summary["best"]["value"] > 2.0 / trainer.info.num_classes
        assert not any(p.requires_grad for p in trainer.objective.mixer.parameters())
        runs[mode] = tmp_path / mode / "best_model.pt"
    assert list((tmp_path / "soft").glob("*/shards/*.npz"))
    report = compare(
        [runs["online"], runs["cached"]],
        [teachers["global"], teachers["regional"]],
        "test",
        tmp_path / "report",
    )
    assert [r["role"] for r in report["rows"]] == ["teacher", "student", "student"] * 2
    assert {r["test_set"] for r in report["rows"]} == {"all", "EU_SW"}
    student = report["rows"][1]
    assert student["soft_labels"] == "online" and student["params"] > 0 and student["macs"] > 0
    assert all(p["top1_ratio"] is not None for p in report["pairs"]) and len(report["pairs"]) == 4
    assert "| student | teacher |" in markdown(report)


def test_a_student_trains_on_the_stored_views_without_a_teacher_forward(
    shard_root, teachers, tmp_path, monkeypatch
):
    """``distill.cache.views``: the trainer's loader replays the cache's views, every training batch
    looks up the view it carries, and no teacher runs once the cache is built."""
    looked_up, forwards = [], []
    lookup, forward = SoftLabels.lookup, TeacherMix.forward

    def recorded_lookup(self, index, num_classes, view=None):
        looked_up.append(view)
        return lookup(self, index, num_classes, view)

    monkeypatch.setattr(SoftLabels, "lookup", recorded_lookup)
    monkeypatch.setattr(TeacherMix, "forward", lambda self, *a: forwards.append(1) or forward(self, *a))
    cache = {"dir": str(tmp_path / "soft"), "top_k": 20, "views": 3}
    cfg = _student_cfg(shard_root, teachers, tmp_path, "views", soft_labels="cached", cache=cache)
    cfg["train"].update(epochs=2, max_steps=6)
    trainer = Trainer(load_experiment(cfg))
    built = len(forwards)  # the cache's three passes over the split
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert trainer.train_loader.replay is not None and trainer.train_loader.replay.views == 3
    assert len(looked_up) == 6 and all(v is not None and v.max() < 3 for v in looked_up)
    assert built > 0 and len(forwards) == built  # no teacher forward while training
    assert math.isfinite(summary["last_epoch"]["train_kd_loss"])


def test_a_mixed_student_with_a_logit_adjusted_task_term(shard_root, teachers, tmp_path, monkeypatch):
    """Mixup/CutMix with online teachers (who see the mixed batch) and a logit-adjusted label term."""
    seen = []
    forward = TeacherMix.forward

    def recorded(self, images, labels):
        seen.append(images)
        return forward(self, images, labels)

    monkeypatch.setattr(TeacherMix, "forward", recorded)
    cfg = _student_cfg(shard_root, teachers, tmp_path, "mixed", task="logit_adjusted")
    cfg["objective"]["tau"] = 0.5
    cfg["train"].update(epochs=1, max_steps=3, mix={"mixup_alpha": 0.4, "cutmix_alpha": 1.0})
    trainer = Trainer(load_experiment(cfg))
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["steps"] == 3
    counts = [max(c, 1) for c in trainer.info.class_counts]  # the prior's floor: one sample
    expected = torch.tensor([0.5 * math.log(c / sum(counts)) for c in counts])
    assert torch.allclose(trainer.objective.task.adjustment, expected)
    epoch = summary["last_epoch"]
    assert all(math.isfinite(epoch[k]) for k in ("train_loss", "train_task_loss", "train_kd_loss"))
    assert len(seen) == 3  # one teacher forward per training batch, none at validation
    with pytest.raises(ConfigError, match="train.mix: mixup/cutmix need distill.soft_labels: online"):
        load_experiment({**cfg, "distill": {**cfg["distill"], "soft_labels": "cached"}})


@pytest.mark.slow
def test_torchrun_two_ranks_build_the_cache_and_distil(shard_root, teachers, tmp_path):
    cfg = _student_cfg(shard_root, teachers, tmp_path, "ddp", soft_labels="cached")
    cfg["distill"]["cache"]["views"] = 2  # each view's pass split over the ranks, merged in order
    cfg["train"]["epochs"] = 1
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "flora.training.train",
        "--config",
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    (meta,) = (tmp_path / "soft").glob("*/meta.json")
    train, _, _ = create_dataloaders(load_experiment(cfg).data)
    keys = [str(k) for f in (meta.parent / "shards").glob("*.npz") for k in np.load(f)["keys"]]
    assert sorted(keys) == sorted(train.index.keys)  # every sample once, from both ranks
    mixer = build_mixer(load_experiment(cfg).distill, create_dataloaders(load_experiment(cfg).data)[2])
    cache = ensure_cache(load_experiment(cfg), mixer, train.index, torch.device("cpu"))
    assert cache.computed == 0 and cache.views == 2
    train.set_replay(cache.replay(train.index.keys, 0))
    batch = next(iter(train))  # the two ranks' rows, merged, sit at each sample's own (key, view)
    cached = cache.lookup(batch["index"], mixer.num_classes, batch["view"])
    online = mixer(batch["image"], batch["label"])
    assert (cached.argmax(1) == online.argmax(1)).all()  # top-20 of the mixture: same leader
