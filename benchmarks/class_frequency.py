"""Realised class frequency per sampling policy on real shards: how often each species is drawn under
``uniform``, ``power`` 0.5 and ``class_balanced``, against the species' rank by training count.

    python -m benchmarks.class_frequency                           # the sample world, built once
    python -m benchmarks.class_frequency --shards demo_out/shards  # shards you already have

Shards: by default the sample world as ``make demo`` makes it (``WORLD_RECORDS`` records, 40 species,
Zipf-like counts), built once under ``benchmarks/out/class_frequency`` with photos.py's
``build_world_shards`` (as benchmarks/loader.py builds its world); ``--shards`` reads any shard root.

For each policy the training loaders are built as a run builds them (``create_dataloaders``: torch
backend on the CPU, no index cache; only the index and the epoch plan are used, no image is decoded)
and the epoch lists of ``--epochs`` epochs (``train.planner.epoch_list(e)``, before the rank cut) are
counted per species. Species are ranked by their training count (rank 1: the most images; ties by
species id). Per policy: the share of all draws that go to the top ``TOP_SHARE`` of species by rank and
to the rare species (fewer than ``--rare-below`` training images; none on a world whose smallest species
has more), the same share for the bottom ``TOP_SHARE``, draws per species per epoch (min, median, max
of the mean over the epochs), the training samples drawn at least once, and the total-variation
distance of the realised frequencies to the policy's target (loaders/sampling.py's
``target_frequencies``). ``uniform`` is the baseline: every sample once per epoch.

Prints a table, writes ``benchmarks/results/class_frequency.json`` and ``class_frequency.png``
(realised share of the draws per species against class rank, log y, one colour per policy, with the
policy's target as a thin line).

Leaves out: timing (benchmarks/sampling.py builds the plans at 900k samples / 18k species) and reading
images under sampling (benchmarks/loader.py, benchmarks/mixing.py).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from pathlib import Path

import numpy as np

from benchmarks.photos import build_world_shards
from benchmarks.results import REPO, command_line, print_table, publish, pyplot, save_figure
from flora.config import ConfigError
from flora.loaders import create_dataloaders
from flora.loaders.index import LoaderError
from flora.loaders.sampling import target_frequencies

OUT = REPO / "benchmarks" / "out" / "class_frequency"
#: The sample world of ``make demo`` (world/demo.py's ``--records`` default; 40 species).
WORLD_RECORDS = 2000
#: (label, ``data.sampling``) of the policies compared; the first is the baseline.
POLICIES = [
    ("uniform", {}),
    ("power 0.5", {"policy": "power", "power": 0.5}),
    ("class_balanced", {"policy": "class_balanced"}),
]
COLORS = ["#4a7f3b", "#c27c0e", "#3b5f8a"]
#: Epoch lists counted per policy: enough draws that a class_balanced species' count is within ~10%.
EPOCHS = 5
#: The head and the tail: this share of the species, by rank (at least one species).
TOP_SHARE = 0.1
#: A rare species has fewer training images than this.
RARE_BELOW = 5


def class_rank(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The species of ``labels`` by rank (most training samples first, ties by species id) and their
    counts; species with no sample are left out."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    present = np.flatnonzero(counts)
    order = np.lexsort((present, -counts[present]))
    return present[order], counts[present[order]]


def draw_stats(
    labels: np.ndarray,
    lists: list[np.ndarray],
    target: np.ndarray,
    rare_below: int = RARE_BELOW,
    top_share: float = TOP_SHARE,
) -> dict:
    """What ``lists`` (epoch lists of sample ids into ``labels``) realise per species, by class rank.

    Returns plain values: ``realised`` and ``target`` (each species' share of the draws, by rank),
    ``top_share`` / ``bottom_share`` (the draws going to the first / last ``ceil(top_share * S)`` of the
    ``S`` species by rank) and ``target_top_share`` / ``target_bottom_share`` (the policy's),
    ``rare_share`` (to species with fewer than ``rare_below`` samples; None when there is none),
    ``draws_per_epoch`` (min, median, max over species of the mean draws per epoch), ``samples_seen``
    (the share of the samples drawn at least once) and ``tv_to_target``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    species, counts = class_rank(labels)
    ids = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    draws = np.bincount(labels[ids], minlength=len(np.bincount(labels)))[species]
    realised = draws / max(len(ids), 1)
    wanted = np.asarray(target, dtype=np.float64)[species]
    edge = max(1, math.ceil(top_share * len(species)))
    rare = counts < rare_below
    per_epoch = draws / max(len(lists), 1)
    return {
        "draws": len(ids),
        "realised": realised.tolist(),
        "target": wanted.tolist(),
        "top_share": float(realised[:edge].sum()),
        "bottom_share": float(realised[-edge:].sum()),
        "target_top_share": float(wanted[:edge].sum()),
        "target_bottom_share": float(wanted[-edge:].sum()),
        "rare_share": float(realised[rare].sum()) if rare.any() else None,
        "draws_per_epoch": {
            "min": float(per_epoch.min()),
            "median": float(np.median(per_epoch)),
            "max": float(per_epoch.max()),
        },
        "samples_seen": float(np.unique(ids).size / len(labels)),
        "tv_to_target": float(0.5 * np.abs(realised - wanted).sum()),
    }


def epoch_lists(
    shards: Path, sampling: dict, epochs: int, seed: int
) -> tuple[np.ndarray, list, np.ndarray, dict]:
    """The training labels, the lists of epochs ``0 .. epochs - 1``, the policy's target frequencies
    and ``info.sampling``, from the loaders a run with ``data.sampling: sampling`` builds."""
    data = {"shards": str(shards), "backend": "torch", "device": "cpu", "index_cache": "off", "threads": 1,
            "seed": seed, "sampling": sampling}  # fmt: skip
    train, _val, info = create_dataloaders({"data": data}, rank=0, world_size=1)
    planner = train.planner
    lists = [np.array(planner.epoch_list(e)) for e in range(epochs)]
    target = target_frequencies(train.index.labels, planner.streams_of, planner.sampling)
    return np.asarray(train.index.labels), lists, target, info.sampling


def plot(rows: list[dict], counts: np.ndarray, epochs: int, top: int, path: Path) -> None:
    """Realised share of the draws per species (markers) and each policy's target (thin line) against
    class rank, log y; the head (top ``top`` species) marked off."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    rank = np.arange(1, len(counts) + 1)
    for row, color in zip(rows, COLORS, strict=False):
        ax.plot(rank, row["target"], color=color, linewidth=0.8, alpha=0.8)
        ax.plot(rank, row["realised"], "o", color=color, markersize=3.5, label=f"{row['policy']} (realised)")
    ax.axvline(top + 0.5, color="#888", linestyle=":", linewidth=1)
    ax.text(top + 0.7, ax.get_ylim()[1], f" top {top} species", va="top", fontsize=7, color="#555")
    ax.set_yscale("log")
    ax.set_xlabel("class rank (1 = most training images)")
    ax.set_ylabel(f"share of the draws over {epochs} epochs")
    ax.set_title(
        f"{int(counts.sum()):,} training samples, {len(counts)} species ({counts[0]} down to {counts[-1]} "
        "images): realised (points), target (lines)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def shards_label(shards: Path) -> str:
    """``shards`` for the results: repository-relative or as given, never a machine's absolute path."""
    if not shards.is_absolute() or shards.resolve().is_relative_to(REPO):
        return str(shards)  # results.portable makes repository paths relative
    return shards.name


def describe(labels: np.ndarray, rare_below: int) -> dict:
    """The training split's species by rank and what the figures depend on: counts, imbalance ratio
    (most / fewest images), the head's size and share of the samples, the rare species."""
    species, counts = class_rank(labels)
    top = max(1, math.ceil(TOP_SHARE * len(species)))
    return {
        "training_samples": len(labels),
        "species": len(species),
        "max_per_species": int(counts[0]),
        "min_per_species": int(counts[-1]),
        "imbalance_ratio": float(counts[0] / counts[-1]),
        "top_species": top,
        "top_species_sample_share": float(counts[:top].sum() / counts.sum()),
        "rare_below": rare_below,
        "rare_species": int((counts < rare_below).sum()),
        "counts_by_rank": counts.tolist(),
        "species_by_rank": species.tolist(),
    }


def print_results(data: dict, rows: list[dict], epochs: int) -> None:
    """The split in one line, then one row per policy."""
    print(
        f"{data['training_samples']:,} training samples, {data['species']} species, "
        f"{data['max_per_species']} down to {data['min_per_species']} per species (imbalance ratio "
        f"{data['imbalance_ratio']:.1f}); the top {data['top_species']} species hold "
        f"{data['top_species_sample_share']:.1%} of the samples; {data['rare_species']} species have fewer "
        f"than {data['rare_below']} images"
    )
    rare = f"rare (<{data['rare_below']})"
    table = [
        {
            "policy": r["policy"],
            f"top {data['top_species']}": f"{r['top_share']:.1%}",
            f"bottom {data['top_species']}": f"{r['bottom_share']:.1%}",
            rare: "-" if r["rare_share"] is None else f"{r['rare_share']:.1%}",
            **{f"{k}/epoch": f"{v:.1f}" for k, v in r["draws_per_epoch"].items()},
            "samples_seen": f"{r['samples_seen']:.1%}",
            "tv_to_target": f"{r['tv_to_target']:.3f}",
        }
        for r in rows
    ]
    print(f"\nshares of the draws over {epochs} epochs (top, bottom: species by rank; rare: fewer images); "
          "draws per species per epoch (min, median, max)")  # fmt: skip
    print_table(table, list(table[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a shard root (default: the sample world, built once)")
    parser.add_argument("--world-records", type=int, default=WORLD_RECORDS, help="the sample world's records")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epoch lists counted per policy")
    parser.add_argument("--seed", type=int, default=0, help="data.seed")
    parser.add_argument("--rare-below", type=int, default=RARE_BELOW, help="a rare species has fewer images")
    args = parser.parse_args(argv)
    shards = args.shards or build_world_shards(OUT, args.world_records)[0]
    rows, epoch_0 = [], {}
    for label, sampling in POLICIES:
        try:
            labels, lists, target, info = epoch_lists(shards, sampling, args.epochs, args.seed)
        except (ConfigError, LoaderError) as exc:
            raise SystemExit(f"benchmarks.class_frequency: {exc}") from None
        stats = draw_stats(labels, lists, target, args.rare_below)
        rows.append({"policy": label, "sampling": sampling, **stats})
        epoch_0[label] = info["epoch_0"]
    data = describe(labels, args.rare_below)
    print_results(data, rows, args.epochs)
    source = shards_label(shards) if args.shards else f"sample world ({args.world_records} records)"
    result = {
        "benchmark": "class_frequency",
        "command": command_line("benchmarks.class_frequency", argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "input": {"shards": source, "epochs": args.epochs, "seed": args.seed, **data},
        "rows": rows,
        "info_sampling_epoch_0": epoch_0,
    }
    counts = np.asarray(data["counts_by_rank"])
    publish("class_frequency", result, lambda png: plot(rows, counts, args.epochs, data["top_species"], png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
