"""The dataset card's plots: the long tail and the licence mix, PNGs beside ``dataset_card.md``.

Owns ``draw_plots`` and the two figures (matplotlib on the Agg backend, imported only here and only when
a card is drawn; the sharder's own install may lack it, ``HAVE_MATPLOTLIB``: then the card has no plot
and says so): ``long_tail`` (images per species against species rank, one line per split, log scale,
with the card's marks at 5 and 20 images) and ``license_mix`` (samples per licence class per split,
stacked bars, with each split's permissive share). The PNGs carry no software version or time, so the
same card draws the same bytes with the same matplotlib.

Leaves out: the facts (card.py), where the bytes go (the caller's staged files).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger(__name__)

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
#: Plot -> its file beside the card.
PLOTS = {"long_tail": "dataset_card_long_tail.png", "licenses": "dataset_card_licenses.png"}
#: The size of every chart Flora draws (benchmarks/results.py, training/plots.py).
FIGURE_DPI = 110
#: Horizontal marks on the long-tail plot: card.py's FEW and FEW_SHOT.
TAIL_MARKS = (5, 20)
#: Up to this many species a line marks each one; beyond, the markers would hide the line.
MARKED_SPECIES = 200
COLORS = {"permissive": "#4a7f3b", "restrictive": "#b5533c"}
SPLIT_COLORS = {"train": "#4a7f3b", "val": "#3b6a9a", "test": "#b5833c"}


def draw_plots(open_binary: Callable[[str], BinaryIO], card: dict) -> dict[str, str]:
    """Draws the card's plots into ``open_binary(file name)``; returns plot -> file name ({} without
    matplotlib)."""
    if not HAVE_MATPLOTLIB:
        log.warning("dataset card: matplotlib is not installed, so the card has no plots")
        return {}
    plt = _pyplot()
    long_tail(plt, card["images_per_species"], open_binary(PLOTS["long_tail"]))
    license_mix(plt, card["licenses"], open_binary(PLOTS["licenses"]))
    return dict(PLOTS)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def long_tail(plt, per_species: dict[str, dict[str, int]], fh: BinaryIO) -> None:
    """Images per species against species rank (most images first), one line per split, log scale."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for split, counts in per_species.items():
        sizes = sorted(counts.values(), reverse=True)
        if sizes:
            marker = "." if len(sizes) <= MARKED_SPECIES else None
            ax.plot(range(1, len(sizes) + 1), sizes, marker=marker, markersize=3, linewidth=1.2,
                    color=SPLIT_COLORS.get(split), label=f"{split} ({len(sizes)} species)")  # fmt: skip
            drawn = True
    ax.set_yscale("log")
    for mark in TAIL_MARKS:
        ax.axhline(mark, linestyle=":", linewidth=0.8, color="grey")
        ax.annotate(f"{mark}", (0.995, mark), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color="grey")  # fmt: skip
    ax.set_xlabel("species rank")
    ax.set_ylabel("images per species (log)")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.set_ylim(1, 100)
        ax.text(0.5, 0.5, "no sample sharded", transform=ax.transAxes, ha="center")
    ax.set_title("Long tail: images per species", fontsize=10)
    _save(plt, fig, fh)


def license_mix(plt, licenses: dict[str, dict], fh: BinaryIO) -> None:
    """Samples per licence class per split (stacked bars), each labelled with its permissive share."""
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    splits = list(licenses)
    classes = sorted({c for facts in licenses.values() for c in facts["classes"]})
    left = [0] * len(splits)
    for name in classes:
        widths = [licenses[s]["classes"].get(name, 0) for s in splits]
        ax.barh(splits, widths, left=left, label=name, color=COLORS.get(name, "#888888"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, split in enumerate(splits):
        share = licenses[split]["permissive_share"]
        text = "no samples" if share is None else f"{share:.0%} permissive"
        ax.annotate(text, (left[y], y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_xlim(0, max([*left, 1]) * 1.3)  # room for the labels
    if classes:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Licence mix per split", fontsize=10)
    _save(plt, fig, fh)


def _save(plt, fig, fh: BinaryIO) -> None:
    fig.tight_layout()
    with fh:
        fig.savefig(fh, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    plt.close(fig)
