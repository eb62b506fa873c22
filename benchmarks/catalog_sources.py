"""Catalog sources benchmark: the same generated world as JSON Lines, a GBIF Darwin Core Archive, an
iNaturalist open-data export, CSV and Parquet, each through ``flora catalog``, at the seed's size
(340,749 records) and at 900,000, in one run.

Each catalog runs in its own child process (``benchmarks.catalog.run_child``: time from outside, the
child's own peak RSS from ``VmHWM``). The baseline of each size, in the same run, is a child that only
reads and ``json.loads`` the JSON Lines file (the floor of any catalog). Species grow with the
records at the seed's ratio (7,120 per 340,749); half the URLs are duplicates, as in the seed.

The formats carry the same images, not byte-identical records: the archive groups photos into
occurrences and takes the species from the occurrence, iNaturalist builds URLs from photo ids and
takes species from its taxa table (research grade only), tables carry their columns as text. So
records in and written differ a little between rows; what is compared is time and memory.

Targets (issue 30): every source at 340,749 records within the bound the JSON Lines path met before
(``JSONL_340K_PEAK_MIB``, benchmarks/results/catalog.json), and 900,000 records within 1 GiB.

    python -m benchmarks.catalog_sources [--sizes 340749 900000] [--formats jsonl,dwca,inat,csv,parquet]

Writes ``benchmarks/results/catalog_sources.json`` and ``catalog_sources.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from benchmarks.catalog import PARSE_ONLY, REPO, SEED_DUPLICATE_RATE, SEED_RECORDS, SEED_SPECIES, run_child
from benchmarks.results import command_line, print_table, publish, pyplot, save_figure

#: The JSON Lines path's peak at the seed's size before this issue (benchmarks/results/catalog.json).
JSONL_340K_PEAK_MIB = 562
#: The bound at 900,000 records.
PEAK_900K_MIB = 1024
FORMATS = ("jsonl", "dwca", "inat", "csv", "parquet")


def write_source(fmt: str, records: list[dict], folder: Path) -> Path:
    """The world's records in ``fmt``, as its publisher lays them out; returns the ``--source``."""
    if fmt == "jsonl":
        from world import write_jsonl

        path = folder / "catalog.jsonl"
        write_jsonl(records, path)
        return path
    if fmt == "dwca":
        from world.dwca import write_dwca

        path = folder / "gbif_download.zip"
        write_dwca(records, path)
        return path
    if fmt == "inat":
        from world.inat import write_inat

        path = folder / "inaturalist"
        write_inat(records, path)
        return path
    from world.table_files import write_table

    path = folder / f"catalog.{fmt}"
    write_table(records, path, fmt)
    return path


def run_size(n_records: int, formats: list[str], work: Path) -> list[dict]:
    """Every format's catalog of one generated world of ``n_records`` records."""
    from world import WorldSpec, generate_catalog

    species = max(1, round(n_records * SEED_SPECIES / SEED_RECORDS))
    spec = WorldSpec(n_species=species, n_records=n_records, seed=1, duplicate_rate=SEED_DUPLICATE_RATE)
    records = generate_catalog(spec)
    folder = work / f"world_{n_records}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = {}
    for fmt in dict.fromkeys(["jsonl", *formats]):
        started = time.perf_counter()
        sources[fmt] = write_source(fmt, records, folder)
        print(f"{n_records:,} records as {fmt} in {time.perf_counter() - started:.1f} s", flush=True)
    del records
    seconds, peak, _ = run_child("-c", PARSE_ONLY, [str(sources["jsonl"])])
    rows = [
        {
            "records": n_records,
            "source": "baseline: read + json.loads only",
            "seconds": seconds,
            "peak_mib": peak,
        }
    ]
    for fmt in formats:
        out = folder / f"splits_{fmt}"
        argv = ["catalog", "--no-progress", "--source", str(sources[fmt]), "--out", str(out)]
        seconds, peak, _ = run_child("-m", "flora.sharding", argv)
        stats = json.loads((out / "export_stats.json").read_text())
        rows.append(
            {
                "records": n_records,
                "source": fmt,
                "seconds": seconds,
                "peak_mib": peak,
                "records_in": stats["input_records"],
                "written": stats["written"],
                "rejected": stats["rejected"],
                "duplicates": stats["duplicates"],
                "accounting_ok": stats["accounting_ok"],
            }
        )
        shutil.rmtree(out)
    shutil.rmtree(folder)
    base = rows[0]["seconds"]
    for row in rows:
        row["records_per_s"] = row.get("records_in", n_records) / row["seconds"]
        row["vs_baseline_time"] = row["seconds"] / base
        bound = JSONL_340K_PEAK_MIB if n_records <= SEED_RECORDS else PEAK_900K_MIB
        row["peak_bound_mib"] = bound
        row["within_bound"] = row["peak_mib"] <= bound
    return rows


def chart(rows: list[dict]):
    """Peak memory per source and size, with each size's bound."""
    plt = pyplot()
    sizes = list(dict.fromkeys(r["records"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        mine = [r for r in rows if r["records"] == size and not r["source"].startswith("baseline")]
        ax.bar([r["source"] for r in mine], [r["peak_mib"] for r in mine], color="tab:green")
        ax.axhline(mine[0]["peak_bound_mib"], color="tab:red", linestyle="--", label="bound")
        ax.set_title(f"{size:,} records")
        ax.set_ylabel("peak RSS (MiB)")
        ax.legend()
    fig.suptitle("flora catalog: peak memory per source format")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[SEED_RECORDS, 900_000])
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {FORMATS}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "catalog_sources")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}: expected some of {list(FORMATS)}")
    rows = [row for size in args.sizes for row in run_size(size, formats, args.out)]
    columns = ["records", "source", "seconds", "records_per_s", "peak_mib", "peak_bound_mib", "within_bound"]
    print_table(rows, columns + ["records_in", "written"])
    result = {
        "benchmark": "catalog_sources",
        "command": command_line("benchmarks.catalog_sources", argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "targets": {"peak_mib_340k": JSONL_340K_PEAK_MIB, "peak_mib_900k": PEAK_900K_MIB},
        "rows": rows,
        "met": all(r["within_bound"] for r in rows),
    }
    publish(
        "catalog_sources",
        result,
        chart=lambda path: save_figure(chart(rows), path),
        png="catalog_sources.png",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
