"""Mixup and CutMix as batch operations: the mixed images and labels, filler rows left alone, draws from
torch's RNG only, the teachers seeing the student's mixed images, and an exact resume with mixing on."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from flora.training.checkpoint import Preprocessing
from flora.training.config import DistillConfig, MixConfig, load_experiment
from flora.training.distill import Distillation, Teacher, TeacherMix
from flora.training.loop import Trainer
from flora.training.mix import BatchMix, mix_partners

from .conftest import experiment

CLASSES = 6


def _batch(valid=(True, True, False, True, False), size=8):
    n = len(valid)
    images = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    images += torch.rand(n, 3, size, size) * 0.1  # row i's pixels in (i + 1, i + 1.1): a pixel tells its row
    return {
        "image": images,
        "label": torch.arange(n) % CLASSES,
        "valid": torch.tensor(valid),
        "index": torch.arange(n),
    }


def test_partners_are_the_valid_rows_reversed():
    assert mix_partners(torch.tensor([True, True, False, True, False])).tolist() == [3, 1, 2, 0, 4]
    assert mix_partners(torch.tensor([False, False])).tolist() == [0, 1]
    assert mix_partners(torch.ones(4, dtype=torch.bool)).tolist() == [3, 2, 1, 0]


def test_mixup_blends_each_valid_row_with_its_partner_and_leaves_filler_alone():
    batch = _batch()
    torch.manual_seed(0)
    out = BatchMix(MixConfig(mixup_alpha=0.4), CLASSES)(batch)
    x, target = batch["image"], out["mixed_label"]
    lam = target[0, 0].item()  # row 0 (label 0) with row 3 (label 3)
    assert (
        0 < lam < 1 and target[0, 3].item() == pytest.approx(1 - lam) and target[0].sum() == pytest.approx(1)
    )
    assert torch.allclose(out["image"][0], lam * x[0] + (1 - lam) * x[3])
    assert torch.allclose(out["image"][3], lam * x[3] + (1 - lam) * x[0])
    assert target[3, 3].item() == pytest.approx(lam)
    # the middle valid row is its own partner; filler rows are neither mixed nor mixed in
    for row in (1, 2, 4):
        assert torch.equal(out["image"][row], x[row])
        assert target[row].tolist() == [float(c == batch["label"][row]) for c in range(CLASSES)]
    assert torch.equal(out["valid"], batch["valid"]) and torch.equal(out["label"], batch["label"])
    assert torch.equal(out["index"], batch["index"]) and "mixed_label" not in batch  # the input is untouched


def test_cutmix_pastes_one_box_from_the_partner_and_lam_is_the_own_pixel_share():
    batch = _batch(valid=(True, True, True, True), size=16)
    torch.manual_seed(1)
    out = BatchMix(MixConfig(cutmix_alpha=1.0), CLASSES)(batch)
    x = batch["image"]
    pasted = out["image"][0, 0].floor() == 4  # row 0's pixels from row 3 (values in [4, 4.1))
    rows, cols = pasted.nonzero(as_tuple=True)
    assert 0 < len(rows) < 16 * 16
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert pasted.sum() == (bottom - top) * (right - left)  # one rectangle
    lam = out["mixed_label"][0, 0].item()
    assert lam == pytest.approx(1 - pasted.sum().item() / (16 * 16))
    assert out["mixed_label"][0, 3].item() == pytest.approx(1 - lam)
    for row, partner in enumerate([3, 2, 1, 0]):  # the same box in every row, from its partner
        box = out["image"][row][:, top:bottom, left:right]
        assert torch.equal(box, x[partner][:, top:bottom, left:right])
        outside = out["image"][row].clone()
        outside[:, top:bottom, left:right] = x[row][:, top:bottom, left:right]
        assert torch.equal(outside, x[row])


def test_prob_and_switch_prob_choose_how_batches_are_mixed():
    batch = _batch(valid=(True, True, True, True))
    torch.manual_seed(2)
    never = BatchMix(MixConfig(mixup_alpha=1.0, prob=0.0), CLASSES)
    assert never(batch) is batch and not MixConfig(mixup_alpha=1.0, prob=0.0).enabled
    half = BatchMix(MixConfig(mixup_alpha=1.0, prob=0.5), CLASSES)
    mixed = sum("mixed_label" in half(batch) for _ in range(400))
    assert 160 < mixed < 240  # Binomial(400, 0.5): 4 standard deviations either side
    both = {"mixup_alpha": 1.0, "cutmix_alpha": 1.0}
    for switch, cutmix in ((1.0, True), (0.0, False)):
        mix = BatchMix(MixConfig(**both, switch_prob=switch), CLASSES)
        for _ in range(10):
            out, x = mix(batch)["image"][0], batch["image"]
            pixels_of_row_0_or_3 = (out == x[0]) | (out == x[3])  # cutmix; mixup blends every pixel
            assert bool(pixels_of_row_0_or_3.all()) == cutmix


def test_the_draws_come_from_torchs_rng_alone():
    batch = _batch()
    mix = BatchMix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0), CLASSES)
    numpy_before = np.random.get_state()[1].copy()
    torch.manual_seed(5)
    first = [mix(batch) for _ in range(6)]
    torch.manual_seed(5)
    again = [mix(batch) for _ in range(6)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mixed_label"], b["mixed_label"])
    assert np.array_equal(
        np.random.get_state()[1], numpy_before
    )  # the loop seeds torch's per rank, not numpy's


class _Recorder(nn.Module):
    """A network answering fixed logits and keeping its last input."""

    def __init__(self, classes: int):
        super().__init__()
        self.head = nn.Linear(1, classes)

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_the_teachers_see_the_students_mixed_images():
    """Consistent teaching: online KD gives the teacher the very mixed view the student gets."""
    pre = Preprocessing(image_size=8, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, val_resize=8)
    mapping = {str(c): c for c in range(CLASSES)}
    network = _Recorder(CLASSES)
    mixer = TeacherMix(
        [Teacher(network, mapping, pre, "t")], [1.0], mapping, 2.0, "per_class", [0.0] * 3, [1.0] * 3
    )
    objective = Distillation(DistillConfig(teachers=[{"checkpoint": "x"}]), mixer)
    student = _Recorder(CLASSES)
    batch = _batch()
    torch.manual_seed(0)
    mixed = BatchMix(MixConfig(mixup_alpha=0.4), CLASSES)(batch)  # as the loop does before the objective
    assert not torch.equal(mixed["image"], batch["image"])
    out = objective(student, mixed)
    assert torch.equal(student.seen, mixed["image"])
    assert torch.allclose(
        network.seen, (mixed["image"] - 0.5) / 0.25
    )  # the same view, the teacher's normalisation
    assert torch.isfinite(out["loss"]) and out["kd_loss"] > 0


def test_a_run_with_mixing_resumes_to_the_same_weights(shard_root, tmp_path, monkeypatch):
    mixed_batches = []
    call = BatchMix.__call__

    def counted(self, batch):
        out = call(self, batch)
        mixed_batches.append("mixed_label" in out)
        return out

    monkeypatch.setattr(BatchMix, "__call__", counted)

    def cfg(name: str) -> dict:
        mix = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "switch_prob": 0.5}
        out = experiment(shard_root, tmp_path, name, objective={"kind": "logit_adjusted"},
                         train={"epochs": 1, "max_steps": 5, "grad_accum": 2, "mix": mix})  # fmt: skip
        out["data"]["train_remainder"] = "pad"
        return out

    straight = Trainer(load_experiment(cfg("straight")))
    straight.fit()
    assert mixed_batches and all(mixed_batches)  # every micro-batch of the loop was mixed
    first = Trainer(load_experiment(cfg("interrupted")), stop_after=2).fit()
    assert first["status"] == "stopped" and first["steps"] == 2
    resumed = Trainer(load_experiment(cfg("interrupted")), resume=True)
    second = resumed.fit()
    assert second["status"] == "finished" and second["steps"] == straight.step
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    history = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())["epochs"]
    reference = json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    assert history[0]["train_loss"] == pytest.approx(reference[0]["train_loss"])
