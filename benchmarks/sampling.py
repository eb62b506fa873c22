"""Sampling plans at the seed's scale: the time and peak memory of building one epoch's list per
policy, of the whole plan a rank builds from it, and the realised class frequency against class rank.

    python -m benchmarks.sampling                               # 900,000 samples, 18,000 species
    python -m benchmarks.sampling --samples 100000 --species 2000

The label set is Zipf-like (``zipf_labels``: species ``k`` has about ``n / (H * k)`` samples, at least
one, the head taking what the floors leave; exponent 1 gives 95,704 down to 4 samples per species at
900k / 18k, the steep fall of community photo counts), in a random sample order. Two streams: the
samples of a random 20% of the species (region "EU_SW") against the rest, at proportions 0.5 / 0.5.
Each plan is ``epoch_samples`` of
loaders/sampling.py over the whole split; the baseline in the same run is the unsampled plan
(``uniform``, ``np.arange(n)``). Time: the best of ``--repeats`` builds; peak memory: tracemalloc's
peak during one more build (numpy's allocations are traced), over what existed before it.

Rank plans: what one rank builds for an epoch, through loaders/plan.py's own ``Planner`` (its
``rank_plan``: the epoch list, the rank cut, and for a sampled or interleaved list the reading order
in windows of ``--window`` = ``shuffle_buffer``, 4,096 by default, widened by ``reading_window`` to
up to twice that when the plan touches many shards) over a synthetic ``SampleIndex`` of the same labels: no
tars, the samples grouped by region into shards of ``SHARD_SAMPLES`` (as a build writes
``{split}/{region}/*.tar``), so a stream's samples come from its shards' region as in a real run.
Each build starts from a new ``Planner`` (the stream of each sample included) and is timed for rank
0 of world sizes 1 and 8, per policy, without and with the two streams; the identity plan
(``uniform``) is the shard-ordered list cut by rank. ``shard_runs`` counts the runs of one shard in
the rank's reading order: the index files DALI's reader is given for the epoch.

Prints two tables (both checked against the floor: under 2 s and 200 MB at the seed's scale), writes
``benchmarks/results/sampling.json`` and ``sampling.png`` (left: realised share of an epoch's draws per
species against the species' rank by count, for uniform, power 0.5 and class_balanced, with each
policy's target; right: the rank plans' build times).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.results import command_line, print_table, publish, pyplot, save_figure
from flora.config import from_dict
from flora.loaders.config import DataConfig
from flora.loaders.index import SampleIndex
from flora.loaders.plan import Planner, RankPlan
from flora.loaders.sampling import (
    SamplingConfig,
    epoch_samples,
    stream_ids,
    summary,
    target_frequencies,
)
from flora.sharding.format.reader import Shard

#: The seed's scale (issue 26): 900k training samples over 18k species.
SAMPLES, SPECIES = 900_000, 18_000
#: What a plan may cost at that scale (issue 26, item 5).
TARGET_SECONDS, TARGET_PEAK_MB = 2.0, 200.0
MB = 1e6
REGION_SHARE = 0.2  # of the species, in the "EU_SW" stream
TWO_STREAMS = [
    {"name": "EU_SW", "regions": ["EU_SW"], "proportion": 0.5},
    {"name": "rest", "proportion": 0.5},
]
#: (label, sampling config); the first is the baseline. The repeat threshold is set per run (1 / species).
CASES = [
    ("uniform (unsampled)", {}),
    ("uniform, 2 streams", {"streams": TWO_STREAMS}),
    ("class_balanced", {"policy": "class_balanced"}),
    ("class_balanced, 2 streams", {"policy": "class_balanced", "streams": TWO_STREAMS}),
    ("power 0.5", {"policy": "power", "power": 0.5}),
    ("power 0.5, 2 streams", {"policy": "power", "power": 0.5, "streams": TWO_STREAMS}),
    ("repeat_factor t=1/species", {"policy": "repeat_factor"}),
]
CHART = {"uniform (unsampled)": "uniform", "power 0.5": "power 0.5", "class_balanced": "class_balanced"}
#: Rank plans: (label, sampling config); the first is the baseline (the shard-ordered plan), then
#: interleave, CASES' sampled lists and repeat_factor with the two streams.
PLANS = [
    ("uniform (identity)", {}),
    ("uniform, interleave", {"interleave": True}),
    *CASES[1:],
    ("repeat_factor, 2 streams", {"policy": "repeat_factor", "streams": TWO_STREAMS}),
]
WORLD_SIZES = (1, 8)
#: The rank plans' shuffle buffer (data.shuffle_buffer), their reading window before plan.py widens it.
WINDOW = 4096
#: Samples per synthetic shard: the sharder's default ``shards.max_samples``.
SHARD_SAMPLES = 1000


def zipf_labels(samples: int, species: int, exponent: float = 1.0, seed: int = 0) -> np.ndarray:
    """``samples`` labels over ``species`` classes with Zipf-like counts (species ``k`` in proportion to
    ``1 / (k + 1) ** exponent``, at least one sample each; the head takes the rounding), shuffled."""
    weight = 1.0 / np.arange(1, species + 1, dtype=np.float64) ** exponent
    counts = np.maximum(1, np.floor(samples * weight / weight.sum())).astype(np.int64)
    counts[0] += samples - counts.sum()
    if counts[0] < 1:
        raise ValueError(f"{samples} samples cannot give each of {species} species one")
    labels = np.repeat(np.arange(species, dtype=np.int64), counts)
    return np.random.default_rng(seed).permutation(labels)


def regions_of(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each sample's region: "EU_SW" for the samples of a random REGION_SHARE of the species."""
    species = int(labels.max()) + 1
    chosen = np.random.default_rng(seed).random(species) < REGION_SHARE
    return np.where(chosen[labels], "EU_SW", "other")


def shard_index(labels: np.ndarray, regions: np.ndarray) -> SampleIndex:
    """A ``SampleIndex`` of ``labels`` without tars: the samples grouped by region (stable), each
    region cut into shards of SHARD_SAMPLES, every sample permissive. Only the plan's fields are real."""
    order = np.argsort(regions, kind="stable")
    labels, regions = labels[order], regions[order]
    shards, bounds = [], [0]
    for region in dict.fromkeys(regions.tolist()):
        members = np.flatnonzero(regions == region)
        for start in range(int(members[0]), int(members[-1]) + 1, SHARD_SAMPLES):
            rel = f"train/{region}/{len(shards):06d}.tar"
            shards.append(Shard(path=rel, rel=rel, split="train", region=region))
            bounds.append(min(start + SHARD_SAMPLES, int(members[-1]) + 1))
    n = len(labels)
    return SampleIndex(
        root="synthetic",
        split="train",
        shards=shards,
        bounds=np.asarray(bounds, dtype=np.int64),
        keys=[""] * n,  # not read by the plan
        labels=labels,
        jpg_offset=np.zeros(n, dtype=np.int64),
        jpg_size=np.zeros(n, dtype=np.int64),
        class_mapping={str(k): k for k in range(int(labels.max()) + 1)},
        license_class=np.full(n, "permissive"),
    )


def build_rank_plan(
    index: SampleIndex, cfg: DataConfig, epoch: int, world_size: int
) -> tuple[Planner, RankPlan]:
    """Rank 0's plan of ``epoch``, from scratch: a new ``Planner`` (each sample's stream), then
    ``rank_plan`` (the epoch list, the rank cut, the reading order)."""
    planner = Planner(index, cfg, train=True)
    return planner, planner.rank_plan(epoch, 0, world_size)


def measure_rank_plan(index: SampleIndex, cfg: DataConfig, world_size: int, repeats: int) -> dict:
    """The row of rank 0's plan of epoch 0: the best build time of ``repeats``, the peak memory of one
    more build, the list's and the rank's reads and the rank's shard runs (DALI's index files)."""
    times = []
    for epoch in range(repeats):
        started = time.perf_counter()
        build_rank_plan(index, cfg, epoch, world_size)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        planner, plan = build_rank_plan(index, cfg, 0, world_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {
        "world_size": world_size,
        "seconds": min(times),
        "peak_mb": peak / MB,
        "epoch_list": planner.length(0),
        "rank_reads": len(plan.ids),
        "shard_runs": int(np.count_nonzero(np.diff(index.shards_of(plan.ids), prepend=-1))),
    }


def rank_plan_rows(index: SampleIndex, window: int, repeats: int) -> list[dict]:
    """One row per rank plan (PLANS) and world size (WORLD_SIZES) over ``index``."""
    rows = []
    for label, raw in PLANS:
        if raw.get("policy") == "repeat_factor":
            raw = {**raw, "repeat_threshold": 1 / index.num_classes}
        cfg = from_dict(
            DataConfig, {"shards": "synthetic", "shuffle_buffer": window, "sampling": raw}, "data"
        )
        for world_size in WORLD_SIZES:
            row = {"plan": label, **measure_rank_plan(index, cfg, world_size, repeats)}
            rows.append(row)
            print(
                f"  rank plan {label}, world size {world_size}: {row['seconds']:.3f} s, "
                f"peak {row['peak_mb']:.1f} MB, {row['shard_runs']:,} shard runs",
                flush=True,
            )
    return rows


def measure(labels: np.ndarray, streams_of, cfg: SamplingConfig, repeats: int) -> tuple[np.ndarray, dict]:
    """The plan of epoch 0, the best build time of ``repeats`` and the peak memory of one more build."""
    times = []
    for epoch in range(repeats):
        started = time.perf_counter()
        ids = epoch_samples(labels, streams_of, cfg, seed=0, epoch=epoch)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        ids = epoch_samples(labels, streams_of, cfg, seed=0, epoch=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ids, {"seconds": min(times), "peak_mb": peak / MB}


def row_for(label: str, labels, streams_of, cfg, ids, cost: dict) -> dict:
    drawn = summary(ids, labels, streams_of, [s.name for s in cfg.streams])
    realised = np.bincount(labels[ids], minlength=int(labels.max()) + 1) / len(ids)
    per = drawn["draws_per_species"]
    row = {
        "plan": label,
        "seconds": cost["seconds"],
        "peak_mb": cost["peak_mb"],
        "samples": drawn["samples"],
        "species_seen": drawn["species_seen"],
        "draws_min": per["min"],
        "draws_median": per["median"],
        "draws_max": per["max"],
        "tv_to_target": float(0.5 * np.abs(realised - target_frequencies(labels, streams_of, cfg)).sum()),
    }
    if "stream_shares" in drawn:
        row["EU_SW_share"] = drawn["stream_shares"].get("EU_SW", 0.0)
    return row


def plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    counts: np.ndarray,
    plans: list[dict],
    window: int,
    path: Path,
) -> None:
    """Left: realised share per species (points) and the policy's target (line) against rank by count.
    Right: the rank plans' build times per world size, with the floor."""
    plt = pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(14.0, 4.8), gridspec_kw={"width_ratios": [7.5, 6.5]})
    rank = np.arange(1, len(counts) + 1)
    by_count = np.argsort(-counts, kind="stable")
    for (name, (realised, target)), color in zip(
        curves.items(), ["#4a7f3b", "#c27c0e", "#3b5f8a"], strict=False
    ):
        shown = realised[by_count]
        keep = shown > 0  # log axes: species not drawn this epoch are left out of the points
        ax.scatter(rank[keep], shown[keep], s=2, alpha=0.25, color=color, linewidths=0)
        ax.plot(rank, target[by_count], color=color, linewidth=1.5, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("species rank by sample count")
    ax.set_ylabel("share of the epoch's draws")
    ax.set_title(f"{int(counts.sum()):,} samples, {len(counts):,} species: realised (points), target (lines)",
                 fontsize=9)  # fmt: skip
    ax.legend()
    plot_rank_plans(bars, plans, window)
    save_figure(fig, path)


def plot_rank_plans(ax, plans: list[dict], window: int) -> None:
    """Horizontal bars of each rank plan's build time, one bar per world size, peak MB at the bar's end."""
    names = list(dict.fromkeys(r["plan"] for r in plans))
    height = 0.8 / len(WORLD_SIZES)
    for k, (world_size, color) in enumerate(zip(WORLD_SIZES, ["#4a7f3b", "#3b5f8a"], strict=False)):
        mine = {r["plan"]: r for r in plans if r["world_size"] == world_size}
        y = np.arange(len(names)) + (k - (len(WORLD_SIZES) - 1) / 2) * height
        seconds = [mine[n]["seconds"] for n in names]
        ax.barh(y, seconds, height=height, color=color, label=f"world size {world_size}")
        for yi, n, sec in zip(y, names, seconds, strict=True):
            ax.text(sec, yi, f" {mine[n]['peak_mb']:.0f} MB", va="center", fontsize=6)
    ax.axvline(TARGET_SECONDS, color="#a33", linestyle="--", linewidth=1, label=f"floor {TARGET_SECONDS:g} s")
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to build rank 0's plan (lower is better); peak MB at each bar")
    ax.set_title(f"a rank's whole plan: draw, cut, reading order (buffer {window:,})",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")


def epoch_list_rows(labels, regions, repeats: int) -> tuple[list[dict], dict]:
    """One row per epoch list (CASES), and the realised and target shares of the CHART policies."""
    species = int(labels.max()) + 1
    licences = np.full(len(labels), "permissive")
    rows, curves = [], {}
    for label, raw in CASES:
        if raw.get("policy") == "repeat_factor":
            raw = {**raw, "repeat_threshold": 1 / species}
        cfg = from_dict(SamplingConfig, raw, "sampling")
        streams_of = stream_ids(cfg.streams, regions, licences) if cfg.streams else None
        ids, cost = measure(labels, streams_of, cfg, repeats)
        rows.append(row_for(label, labels, streams_of, cfg, ids, cost))
        if label in CHART:
            realised = np.bincount(labels[ids], minlength=species) / len(ids)
            curves[CHART[label]] = (realised, target_frequencies(labels, streams_of, cfg))
        print(f"  {label}: {cost['seconds']:.3f} s, peak {cost['peak_mb']:.1f} MB", flush=True)
    return rows, {name: curves[name] for name in CHART.values()}  # uniform, power 0.5, class_balanced


def within_floor(rows: list[dict]) -> bool:
    return all(r["seconds"] < TARGET_SECONDS and r["peak_mb"] < TARGET_PEAK_MB for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--species", type=int, default=SPECIES)
    parser.add_argument("--zipf", type=float, default=1.0, help="the label set's Zipf exponent")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=WINDOW, help="the rank plans' reading window")
    args = parser.parse_args(argv)
    labels = zipf_labels(args.samples, args.species, args.zipf)
    counts = np.bincount(labels, minlength=args.species)
    print(
        f"{len(labels):,} samples, {args.species:,} species, "
        f"{counts.max():,} down to {counts.min():,} samples per species",
        flush=True,
    )
    regions = regions_of(labels)
    rows, curves = epoch_list_rows(labels, regions, args.repeats)
    index = shard_index(labels, regions)
    plans = rank_plan_rows(index, args.window, args.repeats)
    print("\nepoch lists (sampling.epoch_samples)")
    print_table(
        rows,
        ["plan", "seconds", "peak_mb", "samples", "species_seen", "draws_min", "draws_median", "draws_max",
         "tv_to_target"],
    )  # fmt: skip
    print(f"\nrank plans (plan.Planner: list, rank cut, reading order; shuffle_buffer {args.window:,})")
    print_table(plans, ["plan", "world_size", "seconds", "peak_mb", "epoch_list", "rank_reads", "shard_runs"])
    at_scale = args.samples == SAMPLES and args.species == SPECIES
    met = within_floor(rows) and within_floor(plans)
    print(
        f"\nfloor (under {TARGET_SECONDS:g} s and {TARGET_PEAK_MB:g} MB per plan"
        f"{'' if at_scale else ', at the seed scale only'}): {'met' if met else 'NOT met'}"
    )
    result = {
        "benchmark": "sampling",
        "command": command_line("benchmarks.sampling", argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "input": {
            "samples": args.samples,
            "species": args.species,
            "zipf": args.zipf,
            "max_per_species": int(counts.max()),
            "min_per_species": int(counts.min()),
            "streams": TWO_STREAMS,
            "region_species_share": REGION_SHARE,
        },
        "targets": {
            "seconds": TARGET_SECONDS,
            "peak_mb": TARGET_PEAK_MB,
            "at_seed_scale": at_scale,
            "met": met,
        },
        "rows": rows,
        "rank_plans": {
            "window": args.window,
            "shard_samples": SHARD_SAMPLES,
            "shards": len(index.shards),
            "rank": 0,
            "rows": plans,
        },
    }
    publish("sampling", result, lambda png: plot(curves, counts, plans, args.window, png))
    return 0 if met or not at_scale else 1


if __name__ == "__main__":
    raise SystemExit(main())
