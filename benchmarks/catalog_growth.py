"""Catalog growth benchmark: the seed-sized catalog grown to ~900k records, split again from scratch
and with frozen splits (``--previous``).

The world: a generated catalog of ``--records`` (900,000) records whose species grow with it at the
seed's ratio (7,120 species per 340,749 records); version 1 is a random ``--previous-records``
(340,749) of its lines in catalog order, version 2 all of them. Each catalog runs in its own child
process (``benchmarks.catalog.run_child``: time from outside, the child's own peak RSS). Rows:

* baseline: a child that only reads and ``json.loads`` version 2 (the floor of any catalog);
* v1: the catalog of version 1;
* v2 from scratch: today's behaviour without ``--previous``;
* v2 --previous v1: frozen splits.

Figures: moved (images of both versions whose split differs: must be 0 with ``--previous``; from
scratch it is what the issue measured), of them train -> val/test (leakage for a model trained on
v1 and evaluated on v2), and the per-species deviation from the target fractions (max per size
band, beside the rounding floor a fresh cut of the same groups has).

    python -m benchmarks.catalog_growth [--records 900000] [--previous-records 340749] [--out benchmarks/out]

Writes ``benchmarks/results/catalog_growth.json`` and ``catalog_growth.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from benchmarks.catalog import PARSE_ONLY, REPO, SEED_DUPLICATE_RATE, SEED_RECORDS, SEED_SPECIES, run_child
from benchmarks.results import print_table, publish, pyplot, save_figure

#: The issue's target size: the catalog importing toward 900k records.
GROWN_RECORDS = 900_000
#: The split files compared record by record.
SPLITS = "dataset_splits.jsonl"


def write_versions(records: int, previous_records: int, species: int, out: Path) -> tuple[Path, Path]:
    """Writes version 2 (every generated line) and version 1 (a seeded sample of its lines, in order)."""
    from world import WorldSpec, generate_catalog, write_jsonl

    v2 = out / f"growth_v2_{records}.jsonl"
    v1 = out / f"growth_v1_{previous_records}_of_{records}.jsonl"
    spec = WorldSpec(n_species=species, n_records=records, seed=1, duplicate_rate=SEED_DUPLICATE_RATE)
    started = time.perf_counter()
    write_jsonl(generate_catalog(spec), v2)
    chosen = set(random.Random(0).sample(range(records), previous_records))
    with open(v2, encoding="utf-8") as src, open(v1, "w", encoding="utf-8", newline="\n") as dst:
        dst.writelines(line for n, line in enumerate(src) if n in chosen)
    print(
        f"generated {records:,} records ({species:,} species) "
        f"in {time.perf_counter() - started:.1f} s -> {v2}"
    )
    return v1, v2


def splits_of(folder: Path) -> dict[str, str]:
    with open(folder / SPLITS, encoding="utf-8") as fh:
        return {row["image_url"]: row["split"] for row in map(json.loads, fh)}


def moved(v1: dict[str, str], folder: Path) -> dict[str, int]:
    """Images in both versions, how many changed split, and how many went from train to val/test."""
    both = changed = leaked = 0
    with open(folder / SPLITS, encoding="utf-8") as fh:
        for row in map(json.loads, fh):
            before = v1.get(row["image_url"])
            if before is None:
                continue
            both += 1
            changed += before != row["split"]
            leaked += before == "train" and row["split"] != "train"
    return {"in_both": both, "moved": changed, "train_to_val_or_test": leaked}


def plot(rows: list[dict], bands: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["variant"] for r in rows]
    left.barh(names, [r["seconds"] for r in rows], color="#4a7f3b")
    for y, r in enumerate(rows):
        left.text(r["seconds"], y, f" {r['peak_mib']:,.0f} MiB", va="center", fontsize=8)
    left.set_xlabel("seconds (lower is better); label: peak RSS")
    left.invert_yaxis()
    labels = sorted(bands["fresh"], key=lambda band: int(band.split("-")[0].rstrip("+")))
    xs = range(len(labels))
    for offset, (name, colour) in zip(
        (-0.2, 0.2), (("fresh", "#999999"), ("frozen", "#4a7f3b")), strict=True
    ):
        values = [bands[name][b]["max_deviation"] for b in labels]
        right.bar([x + offset for x in xs], values, width=0.4, label=f"v2 {name}", color=colour)
    right.set_xticks(list(xs), [f"{b} images" for b in labels])
    right.set_ylabel("max |fraction - target| per species")
    right.legend()
    fig.suptitle("catalog growth 340,749 -> 900,000 records: time, memory, per-species deviation", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=GROWN_RECORDS)
    parser.add_argument("--previous-records", type=int, default=SEED_RECORDS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    if not 0 < args.previous_records < args.records:
        parser.error(f"--previous-records must be in (0, --records), got {args.previous_records}")
    species = round(SEED_SPECIES * args.records / SEED_RECORDS)
    args.out.mkdir(parents=True, exist_ok=True)
    v1_src, v2_src = write_versions(args.records, args.previous_records, species, args.out)
    out = {name: args.out / f"growth_{name}" for name in ("v1", "v2_fresh", "v2_frozen")}
    catalog = ["flora.sharding", ["catalog", "--no-progress"]]

    rows = []
    seconds, peak, _ = run_child("-c", PARSE_ONLY, [str(v2_src)])
    rows.append(
        {
            "variant": "baseline: read + json.loads v2",
            "records": args.records,
            "seconds": seconds,
            "peak_mib": peak,
        }
    )
    runs = (
        ("v1", v1_src, [], args.previous_records),
        ("v2_fresh", v2_src, [], args.records),
        ("v2_frozen", v2_src, ["--previous", str(out["v1"])], args.records),
    )
    labels = {"v1": "v1 catalog", "v2_fresh": "v2 from scratch", "v2_frozen": "v2 --previous v1"}
    for name, src, extra, n in runs:
        seconds, peak, stdout = run_child(
            "-m", catalog[0], [*catalog[1], "--source", str(src), "--out", str(out[name]), *extra]
        )
        rows.append({"variant": labels[name], "records": n, "seconds": seconds, "peak_mib": peak})
        print(stdout.rstrip())
    for row in rows:
        row["records_per_s"] = row["records"] / row["seconds"]

    v1 = splits_of(out["v1"])
    analysis = {
        name: json.loads((out[name] / "split_analysis.json").read_text())
        for name in ("v2_fresh", "v2_frozen")
    }
    comparison = {name: moved(v1, out[name]) for name in ("v2_fresh", "v2_frozen")}
    growth = analysis["v2_frozen"]["growth"]
    if comparison["v2_frozen"]["moved"] or growth["moved"]:
        raise AssertionError(f"frozen splits moved images: {comparison['v2_frozen']}, {growth}")
    fractions = {name.removeprefix("v2_"): analysis[name]["fractions"] for name in analysis}
    bands = {name: f["by_size"] for name, f in fractions.items()}

    print_table(rows, ["variant", "records", "seconds", "records_per_s", "peak_mib"])
    for name, c in comparison.items():
        f = fractions[name.removeprefix("v2_")]
        print(
            f"{name}: {c['in_both']:,} images in both versions, moved {c['moved']:,} "
            f"({c['train_to_val_or_test']:,} train -> val/test); "
            f"max deviation by size {json.dumps(f['by_size'])}"
        )
    result = {
        "benchmark": "catalog_growth",
        "command": "python -m benchmarks.catalog_growth"
        + ("" if args.records == GROWN_RECORDS else f" --records {args.records}")
        + ("" if args.previous_records == SEED_RECORDS else f" --previous-records {args.previous_records}"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "input": {
            "records": args.records,
            "previous_records": args.previous_records,
            "species": species,
            "duplicate_rate": SEED_DUPLICATE_RATE,
        },
        "growth": {
            k: growth[k] for k in ("kept", "new", "removed", "moved", "removed_by_reason", "previous_records")
        },
        "moved": comparison,
        "fractions": {
            name: {
                k: f[k]
                for k in (
                    "stratified_species",
                    "max_deviation",
                    "max_fresh_deviation",
                    "groups_off_fresh",
                    "species_off_fresh",
                    "by_size",
                )
            }
            for name, f in fractions.items()
        },
        "rows": rows,
    }
    publish("catalog_growth", result, lambda png: plot(rows, bands, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
