import math

import numpy as np
import pytest
import torch

from flora.training.metrics import (
    Predictions,
    calibration_bins,
    confused_pairs,
    expected_calibration_error,
    fit_temperature,
    macro_accuracy,
    nll,
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
