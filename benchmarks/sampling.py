"""Sampling plans at the seed's scale: the time and peak memory of building one epoch's list per
policy, and the realised class frequency against class rank.

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

Prints a table, writes ``benchmarks/results/sampling.json`` and ``sampling.png`` (realised share of an
epoch's draws per species against the species' rank by count, for uniform, power 0.5 and
class_balanced, with each policy's target).
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
from flora.loaders.sampling import (
    SamplingConfig,
    epoch_samples,
    stream_ids,
    summary,
    target_frequencies,
)

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


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], counts: np.ndarray, path: Path) -> None:
    """Realised share per species (points) and the policy's target (line) against rank by count."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
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
    ax.set_title(f"{int(counts.sum()):,} samples, {len(counts):,} species: realised (points), target (lines)")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--species", type=int, default=SPECIES)
    parser.add_argument("--zipf", type=float, default=1.0, help="the label set's Zipf exponent")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    labels = zipf_labels(args.samples, args.species, args.zipf)
    counts = np.bincount(labels, minlength=args.species)
    print(
        f"{len(labels):,} samples, {args.species:,} species, "
        f"{counts.max():,} down to {counts.min():,} samples per species",
        flush=True,
    )
    regions = regions_of(labels)
    licences = np.full(len(labels), "permissive")
    rows, curves = [], {}
    for label, raw in CASES:
        if raw.get("policy") == "repeat_factor":
            raw = {**raw, "repeat_threshold": 1 / args.species}
        cfg = from_dict(SamplingConfig, raw, "sampling")
        streams_of = stream_ids(cfg.streams, regions, licences) if cfg.streams else None
        ids, cost = measure(labels, streams_of, cfg, args.repeats)
        rows.append(row_for(label, labels, streams_of, cfg, ids, cost))
        if label in CHART:
            realised = np.bincount(labels[ids], minlength=args.species) / len(ids)
            curves[CHART[label]] = (realised, target_frequencies(labels, streams_of, cfg))
        print(f"  {label}: {cost['seconds']:.3f} s, peak {cost['peak_mb']:.1f} MB", flush=True)
    print_table(
        rows,
        ["plan", "seconds", "peak_mb", "samples", "species_seen", "draws_min", "draws_median", "draws_max",
         "tv_to_target"],
    )  # fmt: skip
    at_scale = args.samples == SAMPLES and args.species == SPECIES
    met = all(r["seconds"] < TARGET_SECONDS and r["peak_mb"] < TARGET_PEAK_MB for r in rows)
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
    }
    ordered = {name: curves[name] for name in CHART.values()}  # uniform, power 0.5, class_balanced
    publish("sampling", result, lambda png: plot(ordered, counts, png))
    return 0 if met or not at_scale else 1


if __name__ == "__main__":
    raise SystemExit(main())
