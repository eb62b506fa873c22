import math

import numpy as np
import pytest
import torch

from flora.training.metrics import (
    BUCKET_THRESHOLDS,
    SCALE_BELOW,
    Predictions,
    bucket_metrics,
    bucket_rule,
    calibration_bins,
    confused_pairs,
    expected_calibration_error,
    fit_temperature,
    macro_accuracy,
    nll,
    per_species,
    summarize,
    topk_correct,
)


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.0], [0.9, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 0.3]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, 1).tolist() == [True, False, False]
    assert topk_correct(logits, labels, 2).tolist() == [True, False, False]
    assert topk_correct(logits, labels, 3).tolist() == [True, True, False]
    assert topk_correct(logits, labels, 10).tolist() == [True, True, True]  # k capped at 4 classes


def test_macro_accuracy_weights_each_class_once():
    # class 0: 3 of 4 right; class 1: 0 of 1; class 2: 1 of 1 -> (0.75 + 0 + 1) / 3; plain accuracy 4/6
    labels = np.array([0, 0, 0, 0, 1, 2])
    correct = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    assert macro_accuracy(correct, labels) == pytest.approx((0.75 + 0 + 1) / 3)


def test_ece_by_hand():
    conf = np.array([0.9, 0.9, 0.6, 0.3])
    correct = np.array([1, 0, 1, 0], dtype=bool)
    # bins of width 1/15: 0.9 -> (0.8667, 0.9333]: acc 0.5, conf 0.9 -> 2/4 * 0.4
    # 0.6 -> (0.5333, 0.6]: acc 1, conf 0.6 -> 1/4 * 0.4; 0.3 -> (0.2667, 0.3333]: acc 0 -> 1/4 * 0.3
    assert expected_calibration_error(conf, correct) == pytest.approx(0.2 + 0.1 + 0.075)
    bins = calibration_bins(conf, correct)
    assert [b["count"] for b in bins if b["count"]] == [1, 1, 2]
    assert sum(b["count"] for b in bins) == 4
    # a confidence exactly on an edge belongs to the lower bin; 0 goes to the first
    edge = calibration_bins(np.array([1 / 15, 0.0, 1.0]), np.array([1, 1, 1], dtype=bool))
    assert edge[0]["count"] == 2 and edge[-1]["count"] == 1
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1], dtype=bool)) == 0.0


def test_nll_by_hand():
    assert nll(torch.zeros(1, 2), torch.tensor([0])) == pytest.approx(math.log(2))
    assert nll(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), temperature=2.0) == pytest.approx(
        -math.log(math.e / (math.e + 1))
    )


def test_temperature_recovers_the_scale_of_overconfident_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=gen) * 2
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=gen).squeeze(1)  # calibrated at T = 1
    t = fit_temperature(z * 2.5, labels)  # 2.5x overconfident
    assert t == pytest.approx(2.5, rel=0.05)
    assert nll(z * 2.5, labels, t) < nll(z * 2.5, labels)


def _preds(index, labels, logits):
    p = Predictions()
    p.add(
        torch.tensor(logits),
        torch.tensor(labels),
        torch.tensor(index),
        torch.ones(len(index), dtype=torch.bool),
    )
    return p.arrays()


def test_merge_is_exact_and_refuses_duplicates():
    a = _preds([3, 0], [1, 0], [[0.0, 1.0], [2.0, 0.0]])
    b = _preds([1, 2], [1, 1], [[1.0, 0.0], [0.0, 3.0]])
    merged = Predictions.merge([a, b])
    assert merged["index"].tolist() == [0, 1, 2, 3]
    s = summarize(merged)
    assert (s["samples"], s["top1"]) == (4, 0.75)
    assert (
        s["macro_top1"] == pytest.approx((1 + 2 / 3) / 2) and s["macro_top5"] == 1.0
    )  # 2 classes: all top-2
    with pytest.raises(RuntimeError, match="twice"):
        Predictions.merge([a, _preds([0], [0], [[1.0, 0.0]])])


def test_invalid_rows_are_not_counted():
    p = Predictions()
    p.add(
        torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.tensor([5, 6, 5]), torch.tensor([True, True, False])
    )
    assert p.arrays()["index"].tolist() == [5, 6]


def test_confused_pairs_by_hand():
    records = {"label": np.array([0, 0, 0, 1, 2]), "topk": np.array([[1], [1], [0], [2], [2]])}
    pairs = confused_pairs(records, ["a", "b", "c"])
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2, "true_support": 3}
    assert pairs[1]["true"] == "b" and pairs[1]["predicted"] == "c" and len(pairs) == 2


#: The test shards' training counts per class (tests/training/conftest.py's global teacher).
SMALL_SPLIT = [14, 7, 21, 32, 45, 86, 19, 10, 10, 12, 17, 11]


def test_buckets_keep_the_literatures_thresholds_on_a_large_split():
    rule = bucket_rule([5, 19, 20, 100, 101, 1280])
    assert (rule.thresholds, rule.scaled) == (BUCKET_THRESHOLDS, False) == ((20, 100), False)
    assert "the largest class has 1,280 >= 1,000" in rule.rule
    # few < 20 <= medium <= 100 < many; a species without training images is few-shot
    assert rule.assign([19, 20, 100, 101, 0, 5000]).tolist() == [2, 1, 1, 0, 2, 0]
    assert bucket_rule([10, SCALE_BELOW]).scaled is False


def test_buckets_scale_to_a_small_split_by_the_stated_rule():
    # lo = 7, hi = 86: each threshold keeps its place between ImageNet-LT's 5 and 1,280 on a log scale:
    # 20 -> 7 * (86 / 7) ** (log 4 / log 256) = 13.1; 100 -> 7 * (86 / 7) ** (log 20 / log 256) = 27.2
    rule = bucket_rule(SMALL_SPLIT)
    assert rule.scaled and rule.thresholds == (13, 27) and rule.requested == (20, 100)
    assert rule.rule.startswith(
        "many > 27, medium 13-27, few < 13 training images: 20/100 scaled, the largest"
    )
    assert "(7..86)" in rule.rule
    buckets = rule.assign(SMALL_SPLIT)
    assert np.bincount(buckets).tolist() == [3, 4, 5]  # many, medium, few: none empty
    unscaled = bucket_rule(SMALL_SPLIT, scale=False).assign(SMALL_SPLIT)
    assert np.bincount(unscaled, minlength=3).tolist() == [0, 4, 8]  # unscaled: no many-shot species
    # classes without training images do not set the smallest class; configured thresholds scale too
    assert bucket_rule([0, *SMALL_SPLIT]).thresholds == (13, 27)
    assert bucket_rule(SMALL_SPLIT, (10, 50)).thresholds == (
        round(7 * (86 / 7) ** (math.log(2) / math.log(256))),
        round(7 * (86 / 7) ** (math.log(10) / math.log(256))),
    )
    one_count = bucket_rule([30, 30, 30])  # every species medium-shot
    assert one_count.thresholds == (20, 30) and one_count.assign([30, 30, 30]).tolist() == [1, 1, 1]
    unscaled = bucket_rule(SMALL_SPLIT, (5, 50), scale=False)
    assert (unscaled.thresholds, unscaled.scaled) == ((5, 50), False)
    # scaling never raises a threshold: classes of hundreds of images keep 20 and 100 (all many-shot)
    large = bucket_rule([500, 900])
    assert (large.thresholds, large.scaled) == ((20, 100), False) and "would not lower them" in large.rule
    assert bucket_rule([20, 300]).thresholds == (20, round(20 * 15 ** (math.log(20) / math.log(256))))  # 87
    for bad in ((100, 20), (0, 10), (20, 20)):
        with pytest.raises(ValueError, match="two increasing positive counts"):
            bucket_rule(SMALL_SPLIT, bad)


def _tail_records():
    """Classes 0, 1 many-shot, 2 medium, 3 few-shot (no test samples); top-2 predictions."""
    return {
        "label": np.array([0, 0, 0, 1, 2, 2]),
        "topk": np.array([[0, 1], [1, 0], [0, 2], [0, 3], [2, 0], [3, 1]]),
        "confidence": np.array([0.9, 0.9, 0.6, 0.6, 0.8, 0.4]),
    }


def test_bucket_metrics_by_hand_with_an_empty_bucket():
    records = _tail_records()
    calibrated = np.array([0.7, 0.7, 0.5, 0.5, 0.6, 0.3])
    out = bucket_metrics(records, np.array([0, 0, 1, 2]), calibrated)
    assert list(out) == ["many", "medium", "few"] and out["few"] is None
    many, medium = out["many"], out["medium"]
    # many: top-1 [1, 0, 1, 0], top-2 [1, 1, 1, 0]; class 0 2/3 right, class 1 0/1
    assert (many["samples"], many["species"], many["top1"], many["top5"]) == (4, 2, 0.5, 0.75)
    assert many["macro_top1"] == pytest.approx((2 / 3 + 0) / 2)
    # ECE: bin of 0.9 (acc 1/2) 2/4 * 0.4 + bin of 0.6 (acc 1/2) 2/4 * 0.1; after: 2/4 * 0.2 + 2/4 * 0
    assert many["ece"] == pytest.approx(0.25) and many["ece_calibrated"] == pytest.approx(0.1)
    assert (medium["samples"], medium["species"], medium["top1"], medium["top5"]) == (2, 1, 0.5, 0.5)
    # 0.8 right: 1/2 * 0.2, 0.4 wrong: 1/2 * 0.4; after: 0.6 right 1/2 * 0.4, 0.3 wrong 1/2 * 0.3
    assert medium["ece"] == pytest.approx(0.3) and medium["ece_calibrated"] == pytest.approx(0.35)
    assert bucket_metrics(records, np.array([0, 0, 1, 2]))["many"]["ece_calibrated"] is None
    # buckets partition the samples: their top-1 weighted by samples is the global top-1
    everything = bucket_metrics(records, np.array([0, 0, 0, 0]))
    assert everything["medium"] is None and everything["many"]["top1"] == pytest.approx(3 / 6)


def test_per_species_by_hand():
    records = _tail_records()
    out = per_species(records, np.array([0.7, 0.7, 0.5, 0.5, 0.6, 0.3]))
    assert out["classes"].tolist() == [0, 1, 2] and out["samples"].tolist() == [3, 1, 2]
    assert out["top1"] == pytest.approx([2 / 3, 0, 0.5])
    assert out["confidence"] == pytest.approx([0.8, 0.6, 0.6])
    assert out["gap"] == pytest.approx([0.8 - 2 / 3, 0.6, 0.1])
    assert out["gap_calibrated"] == pytest.approx([1.9 / 3 - 2 / 3, 0.5, -0.05])
    assert per_species(records)["gap_calibrated"] is None
