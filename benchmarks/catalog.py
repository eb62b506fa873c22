"""Catalog benchmark: the seed-sized catalog (340,749 records, 7,120 species, ~50% duplicate URLs)
through validation, dedup and split, from JSONL and from MongoDB, in one run.

Each variant runs ``flora catalog`` in a child process, timed from outside, with its
peak memory read by the child itself at exit (``VmHWM`` of /proc/self/status: the high-water mark
of its own address space; ``ru_maxrss`` would include the forked parent's pages). The baseline,
in the same run, is the floor any catalog must pay: a child that only reads and ``json.loads``
every line of the same file. The ratio catalog/baseline says how much the catalog's work costs on
top of parsing, whatever the machine.

    python -m benchmarks.catalog [--records 340749] [--species 7120] [--no-mongo] [--out benchmarks/out]

Writes ``benchmarks/results/catalog.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results import print_table, publish

REPO = Path(__file__).resolve().parents[1]
#: The seed's catalog: 340,749 records, 169,368 of them duplicates (49.7%), 7,120 species.
SEED_RECORDS, SEED_SPECIES, SEED_DUPLICATE_RATE = 340_749, 7_120, 0.497

PARSE_ONLY = """
import json, sys
n = 0
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        if line.strip():
            json.loads(line); n += 1
print(n)
"""
# Runs ``-m module args`` or ``-c code args`` and reports the process's own peak RSS on stderr at exit.
PEAK_WRAPPER = """
import atexit, runpy, sys
def _peak():
    with open("/proc/self/status") as fh:
        kb = next(line.split()[1] for line in fh if line.startswith("VmHWM"))
    sys.stderr.write(f"\\nPEAK_KB {kb}\\n")
atexit.register(_peak)
mode, target, *rest = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
"""


def run_child(mode: str, target: str, args: list[str]) -> tuple[float, float, str]:
    """Runs ``python -m target args`` (mode ``-m``) or ``python -c target args`` (mode ``-c``) in a
    child; returns (seconds, the child's peak RSS in MiB, its stdout)."""
    argv = [sys.executable, "-c", PEAK_WRAPPER, mode, target, *args]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{target} {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_KB ", 1)[1].split()[0])
    return seconds, peak_kb / 1024, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=SEED_RECORDS)
    parser.add_argument("--species", type=int, default=SEED_SPECIES)
    parser.add_argument("--no-mongo", action="store_true", help="skip the MongoDB variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)

    from world import WorldSpec, generate_catalog, write_jsonl

    args.out.mkdir(parents=True, exist_ok=True)
    spec = WorldSpec(
        n_species=args.species, n_records=args.records, seed=1, duplicate_rate=SEED_DUPLICATE_RATE
    )
    source = args.out / f"catalog_{args.records}_{args.species}.jsonl"
    started = time.perf_counter()
    records = generate_catalog(spec)
    write_jsonl(records, source)
    print(f"generated {len(records):,} records in {time.perf_counter() - started:.1f} s -> {source}")

    catalog = ["catalog", "--no-progress", "--region", "EU_SW"]
    rows = []
    base_s, base_mb, _ = run_child("-c", PARSE_ONLY, [str(source)])
    rows.append({"variant": "baseline: read + json.loads only", "seconds": base_s, "peak_mib": base_mb})
    seconds, peak, out = run_child(
        "-m", "flora.sharding", [*catalog, "--source", str(source), "--out", str(args.out / "splits_jsonl")]
    )
    rows.append({"variant": "catalog from JSONL", "seconds": seconds, "peak_mib": peak})
    stats = json.loads((args.out / "splits_jsonl" / "export_stats.json").read_text())

    if not args.no_mongo:
        from world.mongo import MongoTestServer, load_records

        with MongoTestServer() as server:
            started = time.perf_counter()
            load_records(server.uri, "flora_bench", "images", records)
            load_s = time.perf_counter() - started
            print(f"loaded {len(records):,} documents into MongoDB (SecantusDB) in {load_s:.1f} s")
            uri = f"{server.uri}/flora_bench.images"
            seconds, peak, _ = run_child(
                "-m",
                "flora.sharding",
                [*catalog, "--source", uri, "--out", str(args.out / "splits_mongo"), "mongo.batch_size=5000"],
            )
            rows.append(
                {"variant": "catalog from MongoDB (SecantusDB)", "seconds": seconds, "peak_mib": peak}
            )

    for row in rows:
        row["records_per_s"] = args.records / row["seconds"]
        row["vs_baseline_time"] = row["seconds"] / base_s
    print_table(rows, ["variant", "seconds", "records_per_s", "peak_mib", "vs_baseline_time"])
    result = {
        "benchmark": "catalog",
        "command": "python -m benchmarks.catalog" + (" --no-mongo" if args.no_mongo else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "input": {"records": args.records, "species": args.species, "duplicate_rate": SEED_DUPLICATE_RATE},
        "outcome": {k: stats[k] for k in ("written", "rejected", "duplicates", "species", "accounting_ok")},
        "targets": {"jsonl_seconds_max": 60, "jsonl_peak_mib_max": 1024},
        "rows": rows,
    }
    publish("catalog", result)
    print(out.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
