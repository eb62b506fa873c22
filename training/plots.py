"""Figures of a run and of an evaluation: training curves, reliability diagram, per-species accuracy,
confusion matrix.

Owns the PNGs (matplotlib, Agg backend: no display needed): ``training_curves`` (loss and validation
top-1 per epoch from metrics.json), ``reliability_diagram`` (accuracy vs confidence per ECE bin, before
and after temperature scaling, with the bin counts), ``per_species_accuracy`` (each species' top-1 and
calibration gap against its training images, log scale, with the many / medium / few-shot thresholds),
``confusion_matrix`` (the N most frequent true
species of the evaluated split, row-normalised, with an "other" column for predictions outside them:
a 7,120-class matrix is unreadable, the most-confused pairs go to results.json instead).

Leaves out: computing any metric (metrics.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train loss")
    if any("val_nll" in h for h in history):
        val = [(h["epoch"], h["val_nll"]) for h in history if "val_nll" in h]
        ax_loss.plot(*zip(*val, strict=True), marker="o", label="val NLL")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("val_macro_top1", "val macro")):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax_acc.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    return _save(plt, fig, path, title)


def reliability_diagram(
    before: list[dict], after: list[dict] | None, path: str | Path, title: str = ""
) -> Path:
    """Accuracy per confidence bin (bars), each bin's mean confidence (dots) and the diagonal; sample
    counts at the foot of the bars. ``after``: the temperature-scaled bins in a second panel."""
    plt = _plt()
    panels = [("uncalibrated", before)] + ([("temperature-scaled", after)] if after else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (name, bins) in zip(axes[0], panels, strict=True):
        width = bins[0]["hi"] - bins[0]["lo"]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        acc = [b["accuracy"] or 0.0 for b in bins]
        conf = [b["confidence"] for b in bins]
        ax.bar(centres, acc, width=width * 0.95, color="#4c72b0", edgecolor="black", label="accuracy")
        filled = [(x, c) for x, c, b in zip(centres, conf, bins, strict=True) if b["count"]]
        if filled:
            ax.plot(*zip(*filled, strict=True), "o", color="#c44e52", label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        for x, b in zip(centres, bins, strict=True):
            if b["count"]:
                ax.text(x, 0.01, str(b["count"]), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path, title)


#: Where a species without training images is drawn on the log axis (log 0 has no place).
ZERO_COUNT_AT = 0.5


def per_species_accuracy(
    train_counts: np.ndarray,
    species: dict,
    thresholds: tuple[int, int],
    path: str | Path,
    title: str = "",
    bucket_top1: dict[str, float | None] | None = None,
) -> Path:
    """Top-1 per species (marker area ~ its test samples) and calibration gap (mean confidence - top-1;
    temperature-scaled too when ``species["gap_calibrated"]``) against training images (log x), with
    the bucket thresholds as vertical lines and each bucket's top-1 (``bucket_top1``: many, medium, few)
    as a horizontal segment across it. ``species``: ``metrics.per_species``."""
    plt = _plt()
    from matplotlib import ticker

    x = np.maximum(np.asarray(train_counts, dtype=np.float64), ZERO_COUNT_AT)
    size = 12 + 60 * species["samples"] / max(1, int(np.max(species["samples"], initial=1)))
    fig, (ax_acc, ax_gap) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    ax_acc.scatter(x, species["top1"], s=size, alpha=0.6, color="#4c72b0", edgecolor="black", linewidth=0.3)
    ax_acc.set_ylim(-0.03, 1.03)
    ax_acc.set_ylabel("top-1 per species")
    ax_gap.axhline(0, color="black", linewidth=0.8)
    ax_gap.scatter(x, species["gap"], s=size, alpha=0.6, color="#c44e52", label="uncalibrated")
    if species.get("gap_calibrated") is not None:
        ax_gap.scatter(x, species["gap_calibrated"], s=size, alpha=0.6, color="#55a868", marker="s",
                       label="temperature-scaled")  # fmt: skip
    ax_gap.set_ylabel("confidence - top-1")
    ax_gap.set_xlabel("training images per species (log)")
    ax_gap.set_xscale("log")
    few, many = thresholds
    for ax in (ax_acc, ax_gap):
        for t in (few, many):
            ax.axvline(t, color="grey", linestyle="--", linewidth=1)
    low, high = ax_acc.get_xlim()
    bucket_top1 = bucket_top1 or {}
    for text, lo, hi in (("many", many, high), ("medium", few, many), ("few", low, few)):
        if hi <= lo:
            continue
        top1 = bucket_top1.get(text)
        label = text if top1 is None else f"{text}: {top1:.2f}"
        ax_acc.text((lo * hi) ** 0.5, 1.0, label, ha="center", va="top", fontsize=8, color="grey")
        if top1 is not None:
            ax_acc.hlines(top1, lo, hi, color="#4c72b0", linewidth=1.5)
    ax_acc.set_xlim(low, high)
    ax_gap.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_gap.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_gap.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax_gap.legend(loc="best", fontsize=8)
    ax_acc.set_title(f"few < {few} <= medium <= {many} < many training images", fontsize=9)
    return _save(plt, fig, path, title)


def confusion_matrix(
    labels: np.ndarray,
    preds: np.ndarray,
    names: list[str],
    path: str | Path,
    top_n: int = 20,
    title: str = "",
) -> Path:
    """Row-normalised confusion among the ``top_n`` most frequent true classes (+ an "other" column)."""
    plt = _plt()
    classes, counts = np.unique(labels, return_counts=True)
    chosen = classes[np.argsort(-counts, kind="stable")][:top_n]
    position = {int(c): i for i, c in enumerate(chosen)}
    k = len(chosen)
    matrix = np.zeros((k, k + 1))
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        if t in position:
            matrix[position[t], position.get(p, k)] += 1
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.35 * k + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    tick_names = [names[int(c)] for c in chosen]
    ax.set_xticks(range(k + 1), [*tick_names, "other"], rotation=90, fontsize=7)
    ax.set_yticks(range(k), tick_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title or f"confusion among the {k} most frequent species (row-normalised)")
    return _save(plt, fig, path)
