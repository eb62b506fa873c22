"""Classification metrics for a long tail: top-k, macro accuracy, NLL, ECE, temperature scaling,
many / medium / few-shot buckets.

Owns the metric functions (each unit-tested against hand-computed cases) and ``Predictions``, the
per-sample record a validation or test pass keeps (sample id, label, top-k classes, confidence,
NLL; optionally the logits for calibration). Records from every rank are merged into one before any
metric is computed, and the merge refuses duplicates, so distributed metrics are exact: each sample
counts once, whatever the ranks' shares.

* Top-1 / top-5: the label is among the k highest logits (ties broken by ``torch.topk``).
* Macro top-1 / top-5: the mean over species *present in the evaluated labels* of each species' top-1
  (top-5) (for the long tail, where plain top-1 is dominated by the common species).
* ECE: Guo et al. 2017, 15 equal-width confidence bins over (0, 1]; sum over bins of
  ``|bin| / n * |accuracy(bin) - mean confidence(bin)|``, confidence = max softmax probability.
* Temperature scaling: one scalar ``T`` minimising the NLL of ``softmax(z / T)`` on held-out logits,
  fitted with LBFGS on ``log T`` (so ``T`` stays positive).
* Buckets: a species is many-shot with more than 100 training images, medium-shot with 20-100,
  few-shot with fewer than 20 (Liu et al. 2019, ImageNet-LT; the thresholds are configurable). When
  the largest training class holds fewer than 1,000 images (``SCALE_BELOW``), the thresholds are
  scaled so that each keeps its place on a log scale between the smallest and the largest class
  (``bucket_rule``; never raised). Each bucket reports top-1, top-5, macro top-1 and ECE (before and
  after temperature scaling) over its species' test samples, or None when it has none.

Leaves out: running the model (loop.py), plots (plots.py), files (evaluate.py).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15  # Guo et al. 2017
TOP_K = 5
#: The buckets' names, most training images first (``BucketRule.assign`` numbers them 0, 1, 2).
BUCKETS = ("many", "medium", "few")
#: Few-shot below the first, many-shot above the second (training images per species): the long-tail
#: literature's (Liu et al. 2019 on ImageNet-LT and Places-LT; Kang et al. 2020 on iNaturalist 2018).
BUCKET_THRESHOLDS = (20, 100)
#: The thresholds were defined on training splits whose largest class holds 1,000 (iNaturalist 2018) to
#: 4,980 (Places-LT) images; below that they are scaled, or the many-shot bucket would be nearly empty.
SCALE_BELOW = 1000
#: ImageNet-LT's smallest and largest training classes: 20 and 100 sit 25% and 54% of the way from one to
#: the other on a log scale, and scaled thresholds keep those places between a split's own extremes.
REFERENCE_RANGE = (5, 1280)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool per sample: the label is among the ``k`` highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def macro_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's accuracy."""
    if len(labels) == 0:
        return float("nan")
    classes, inverse = np.unique(labels, return_inverse=True)
    hits = np.bincount(inverse, weights=correct.astype(np.float64), minlength=len(classes))
    counts = np.bincount(inverse, minlength=len(classes))
    return float(np.mean(hits / counts))


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over (0, 1]: ``lo``, ``hi``, ``count``, ``accuracy``, ``confidence`` each.

    A confidence ``c`` falls in bin ``i`` when ``i / n < c <= (i + 1) / n`` (the first bin also takes 0).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        sel = index == i
        count = int(sel.sum())
        bins.append(
            {
                "lo": i / n_bins,
                "hi": (i + 1) / n_bins,
                "count": count,
                "accuracy": float(correct[sel].mean()) if count else None,
                "confidence": float(confidence[sel].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins (Guo et al. 2017)."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    bins = calibration_bins(confidence, correct, n_bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, labels, reduction="mean"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (LBFGS on ``log T``, from T = 1)."""
    if len(labels) == 0:
        raise ValueError("fit_temperature: no samples to fit on")
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"fit_temperature: the fit diverged (T={t})")
    return t


@dataclass
class Predictions:
    """Per-sample results of one pass; ``add`` per batch, ``merge`` across ranks, then metrics."""

    index: list[np.ndarray] = field(default_factory=list)
    label: list[np.ndarray] = field(default_factory=list)
    topk: list[np.ndarray] = field(default_factory=list)
    confidence: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # kept (float16, CPU) only when asked: calibration

    @classmethod
    def keeping_logits(cls) -> Predictions:
        return cls(logits=[])

    def add(
        self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
    ) -> None:
        keep = valid.bool()
        logits, labels, index = logits[keep].float(), labels[keep], index[keep]
        k = min(TOP_K, logits.shape[1])
        self.index.append(index.cpu().numpy())
        self.label.append(labels.cpu().numpy())
        self.topk.append(logits.topk(k, dim=1).indices.cpu().numpy())
        self.confidence.append(logits.softmax(dim=1).max(dim=1).values.cpu().numpy())
        self.nll.append(F.cross_entropy(logits, labels, reduction="none").cpu().numpy())
        if self.logits is not None:
            self.logits.append(logits.to("cpu", torch.float16))

    def arrays(self) -> dict[str, np.ndarray]:
        """This rank's records as flat arrays (what ``merge`` exchanges)."""

        def cat(parts, shape=(0,), dtype=np.float64):
            return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

        out = {
            "index": cat(self.index, dtype=np.int64),
            "label": cat(self.label, dtype=np.int64),
            "topk": cat(self.topk, shape=(0, TOP_K), dtype=np.int64),
            "confidence": cat(self.confidence),
            "nll": cat(self.nll),
        }
        if self.logits is not None:
            out["logits"] = torch.cat(self.logits) if self.logits else torch.zeros(0, 0, dtype=torch.float16)
        return out

    @staticmethod
    def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One record set from every rank's ``arrays()``, sorted by sample id; duplicates are an error."""
        merged = {}
        for key in parts[0]:
            values = [p[key] for p in parts if len(p[key])]
            if key == "logits":
                merged[key] = torch.cat(values) if values else parts[0][key]
            else:
                merged[key] = np.concatenate(values) if values else parts[0][key]
        order = np.argsort(merged["index"], kind="stable")
        for key in merged:
            merged[key] = merged[key][torch.from_numpy(order)] if key == "logits" else merged[key][order]
        ids = merged["index"]
        if len(ids) and (np.diff(ids) == 0).any():
            dupes = np.unique(ids[1:][np.diff(ids) == 0])
            raise RuntimeError(
                f"evaluation counted {len(dupes)} sample(s) twice across ranks, e.g. {dupes[:5]}"
            )
        return merged


def summarize(records: dict[str, np.ndarray], n_bins: int = ECE_BINS) -> dict:
    """Top-1, top-5, macro top-1 and top-5, NLL and ECE of merged records."""
    labels = records["label"]
    n = len(labels)
    if n == 0:
        return {"samples": 0}
    top1 = records["topk"][:, 0] == labels
    top5 = (records["topk"] == labels[:, None]).any(axis=1)
    return {
        "samples": int(n),
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "macro_top1": macro_accuracy(top1, labels),
        "macro_top5": macro_accuracy(top5, labels),
        "nll": float(records["nll"].mean()),
        "ece": expected_calibration_error(records["confidence"], top1, n_bins),
        "classes_evaluated": int(len(np.unique(labels))),
    }


def confused_pairs(records: dict[str, np.ndarray], names: list[str], top: int = 20) -> list[dict]:
    """The most frequent (true species, predicted species) mistakes, with counts."""
    labels, preds = records["label"], records["topk"][:, 0]
    wrong = labels != preds
    counts = Counter(zip(labels[wrong].tolist(), preds[wrong].tolist(), strict=True))
    support = Counter(labels.tolist())
    return [
        {"true": names[t], "predicted": names[p], "count": c, "true_support": support[t]}
        for (t, p), c in counts.most_common(top)
    ]


@dataclass(frozen=True)
class BucketRule:
    """Many / medium / few-shot by training images: few ``< thresholds[0] <=`` medium ``<=
    thresholds[1] <`` many. ``requested``: the thresholds asked for; ``scaled``: whether they were
    scaled to the split; ``rule``: one sentence saying which thresholds are used and why."""

    thresholds: tuple[int, int]
    requested: tuple[int, int]
    scaled: bool
    rule: str

    def assign(self, class_counts) -> np.ndarray:
        """Per class index: 0 (many), 1 (medium) or 2 (few), the positions in ``BUCKETS``."""
        counts = np.asarray(class_counts)
        few, many = self.thresholds
        return np.where(counts > many, 0, np.where(counts >= few, 1, 2)).astype(np.int64)


def bucket_rule(
    class_counts, requested: tuple[int, int] = BUCKET_THRESHOLDS, scale: bool = True
) -> BucketRule:
    """The thresholds for a training split's ``class_counts`` (images per class index).

    ``requested`` is used as it is unless ``scale`` and the largest class holds fewer than
    ``SCALE_BELOW`` images; then each threshold ``t`` becomes ``lo * (hi / lo) ** p``, rounded, with
    ``p = log(t / 5) / log(1280 / 5)`` its place between ImageNet-LT's smallest and largest classes and
    ``lo``, ``hi`` the split's smallest (non-empty) and largest classes; scaling only ever lowers a
    threshold (a split whose classes all hold hundreds of images keeps 20 and 100).
    """
    few, many = requested
    if not (isinstance(few, int) and isinstance(many, int) and 0 < few < many):
        raise ValueError(f"bucket thresholds must be two increasing positive counts, got {requested}")
    counts = np.asarray(class_counts, dtype=np.int64)
    present = counts[counts > 0]
    stated = f"many > {many}, medium {few}-{many}, few < {few} training images"
    if not scale:
        return BucketRule((few, many), (few, many), False, f"{stated}, as requested (scaling off)")
    if not len(present):
        return BucketRule((few, many), (few, many), False, f"{stated}: no training counts to scale to")
    lo, hi = int(present.min()), int(present.max())
    if hi >= SCALE_BELOW:
        return BucketRule(
            (few, many), (few, many), False, f"{stated}: the largest class has {hi:,} >= {SCALE_BELOW:,}"
        )
    ref_lo, ref_hi = REFERENCE_RANGE
    places = [math.log(t / ref_lo) / math.log(ref_hi / ref_lo) for t in (few, many)]
    scaled_few, scaled_many = (
        min(t, max(1, round(lo * (hi / lo) ** p))) for t, p in zip((few, many), places, strict=True)
    )
    scaled_many = max(scaled_many, scaled_few)
    if (scaled_few, scaled_many) == (few, many):
        return BucketRule(
            (few, many),
            (few, many),
            False,
            f"{stated}: the largest class has {hi:,} < {SCALE_BELOW:,}, but scaling to the split's classes "
            f"({lo}..{hi}) would not lower them",
        )
    rule = (
        f"many > {scaled_many}, medium {scaled_few}-{scaled_many}, few < {scaled_few} training images: "
        f"{few}/{many} scaled, the largest class has {hi:,} < {SCALE_BELOW:,}; each threshold keeps its "
        f"place on a log scale between the smallest and largest class ({lo}..{hi}) that it has between "
        f"ImageNet-LT's ({ref_lo}..{ref_hi:,})"
    )
    return BucketRule((scaled_few, scaled_many), (few, many), True, rule)


def bucket_metrics(
    records: dict[str, np.ndarray],
    class_bucket: np.ndarray,
    calibrated_confidence: np.ndarray | None = None,
    n_bins: int = ECE_BINS,
) -> dict[str, dict | None]:
    """Per bucket (``BUCKETS``): ``samples``, ``species`` (those with test samples), ``top1``, ``top5``,
    ``macro_top1``, ``ece`` and ``ece_calibrated`` (of ``calibrated_confidence``, the temperature-scaled
    confidences; None without) over the test samples of the bucket's species; None for a bucket
    without test samples. ``class_bucket``: ``BucketRule.assign`` of the training counts."""
    labels = records["label"]
    top1 = records["topk"][:, 0] == labels
    top5 = (records["topk"] == labels[:, None]).any(axis=1)
    sample_bucket = np.asarray(class_bucket)[labels]
    out: dict[str, dict | None] = {}
    for i, name in enumerate(BUCKETS):
        sel = sample_bucket == i
        if not sel.any():
            out[name] = None
            continue
        calibrated = None
        if calibrated_confidence is not None:
            calibrated = expected_calibration_error(calibrated_confidence[sel], top1[sel], n_bins)
        out[name] = {
            "samples": int(sel.sum()),
            "species": int(len(np.unique(labels[sel]))),
            "top1": float(top1[sel].mean()),
            "top5": float(top5[sel].mean()),
            "macro_top1": macro_accuracy(top1[sel], labels[sel]),
            "ece": expected_calibration_error(records["confidence"][sel], top1[sel], n_bins),
            "ece_calibrated": calibrated,
        }
    return out


def per_species(records: dict[str, np.ndarray], calibrated_confidence: np.ndarray | None = None) -> dict:
    """Per species with test samples (ascending class index): ``classes``, ``samples``, ``top1``,
    ``confidence`` (mean) and ``gap`` (mean confidence - top-1), and ``gap_calibrated`` with
    ``calibrated_confidence`` (else None)."""
    labels = records["label"]
    classes, inverse, samples = np.unique(labels, return_inverse=True, return_counts=True)

    def mean(values) -> np.ndarray:
        return (
            np.bincount(inverse, weights=np.asarray(values, dtype=np.float64), minlength=len(classes))
            / samples
        )

    top1 = mean(records["topk"][:, 0] == labels)
    confidence = mean(records["confidence"])
    return {
        "classes": classes,
        "samples": samples,
        "top1": top1,
        "confidence": confidence,
        "gap": confidence - top1,
        "gap_calibrated": None if calibrated_confidence is None else mean(calibrated_confidence) - top1,
    }
