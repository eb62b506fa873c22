"""Incremental-build benchmark (issue 17 part 2): growing a shard set by 10% vs rebuilding it.

One loopback image server (a separate process, ``python -m world serve``) behind a catalog of
``--records`` distinct URLs (``/img/<file>?variant=<i>``: distinct bytes drawn from a few hundred
rendered files, as benchmarks/sharder.py). Catalog v1 holds the first 90%; v2 holds all of them and is
built with ``--previous v1`` (frozen splits, a lineage). Then:

1. v1 is built cold (this warms the LMDB cache with v1's records);
2. v2 is built incrementally over a copy of v1's shards: old records are never fetched (their shards are
   kept), the new 10% come from the server;
3. v2 is built in full into a fresh folder with a copy of the cache as 1 left it (warm for the old
   records, the new 10% from the server, as the incremental build had them).

Measured: the seconds of 2 and 3 and their ratio (target >= 5x), the v1 shards rewritten by 2 (sha256 or
mtime changed; target 0) and the shards it added. Near-duplicate dedup is off in all three builds: the
URL variants are one picture with different JPEG comments, which it would (rightly) drop.

    python -m benchmarks.incremental [--records 20000] [--processes 2] [--threads 16]

Writes ``benchmarks/results/incremental.json`` and ``incremental.png``. Leaves out: timing the soft
labels (they are cached per shard, so a grown store computes rows for its new shards only:
tests/training/test_soft_labels.py asserts it with a counting stand-in; timing needs teacher checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results import print_table, publish, pyplot, save_figure
from benchmarks.sharder import make_images, start_server

REPO = Path(__file__).resolve().parents[1]
#: Shard size of the run (samples): 20k records make ~20 shards per build.
SHARD_SAMPLES = 1000
OLD_FRACTION = 0.9
SOFT_LABELS_NOTE = "not timed here: new shards' samples only, asserted in tests/training/test_soft_labels.py"


def write_catalog(
    root: Path, base_url: str, paths: list[str], n: int, name: str, previous: Path | None
) -> Path:
    """A catalog of the first ``n`` records and its splits (``--previous`` when given)."""
    from flora.sharding.catalog.run import run_catalog
    from flora.sharding.config import CatalogConfig

    src = root / f"{name}.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(n):
            url = f"{base_url}/{paths[i % len(paths)]}?variant={i}"
            row = {"plant_id": i % 40, "latin_name": f"Species s{i % 40:02d}", "license": "cc0",
                   "country": "ES", "image_url": url}  # fmt: skip
            fh.write(json.dumps(row) + "\n")
    out = root / f"splits_{name}"
    shutil.rmtree(out, ignore_errors=True)
    run_catalog(str(src), out, CatalogConfig(progress=False), previous=previous)
    return out


def flora_build(splits: Path, out: Path, cache: Path, processes: int, threads: int) -> tuple[float, dict]:
    """One ``flora build`` run; (seconds, manifest)."""
    argv = [sys.executable, "-m", "flora.sharding", "build", "--splits", str(splits), "--out", str(out),
            "--cache", str(cache), "--allow-network", "127.0.0.1/32", "--no-progress",
            f"processes={processes}", f"download.threads={threads}", f"shards.max_samples={SHARD_SAMPLES}",
            "images.resize_shorter_side=256", "near_duplicates.enabled=false"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def tars(out: Path) -> dict[str, tuple[int, int]]:
    """Tar path -> (size, mtime_ns); with the manifest's sha256 check this shows any rewrite."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.glob("*/*/*.tar")}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([r["build"] for r in rows], [r["seconds"] for r in rows], color=["#888", "#2a7", "#c52"])
    for y, r in enumerate(rows):
        ax.text(r["seconds"], y, f" {r['seconds']:.1f} s", va="center")
    ax.set_xlabel("seconds (wall)")
    ax.set_title("Growing a shard set by 10%: incremental vs full rebuild")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="records of v2 (v1: the first 90%%)")
    parser.add_argument("--files", type=int, default=400, help="distinct rendered images behind the URLs")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "incremental")
    args = parser.parse_args(argv)

    root = args.out
    for name in ("v1", "inc", "full", "cache", "cache_full"):
        shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    paths = make_images(root, args.files)
    server, base = start_server(root)
    try:
        old = int(args.records * OLD_FRACTION)
        v1_splits = write_catalog(root, base, paths, old, "v1", None)
        v2_splits = write_catalog(root, base, paths, args.records, "v2", v1_splits)
        cache = root / "cache"
        opts = (cache, args.processes, args.threads)
        v1_s, v1 = flora_build(v1_splits, root / "v1", *opts)
        shutil.copytree(root / "v1", root / "inc")
        shutil.copytree(cache, root / "cache_full")  # the full rebuild's cache: warm for v1's records only
        before = tars(root / "inc")
        inc_s, inc = flora_build(v2_splits, root / "inc", *opts)
        full_s, full = flora_build(v2_splits, root / "full", root / "cache_full", *opts[1:])
    finally:
        server.terminate()
        server.wait()
    after = tars(root / "inc")
    by_path = {s["path"]: s for s in inc["shards"]}
    rewritten = [p for p in before if after.get(p) != before[p] or by_path[p]["version"] != v1["version"]]
    new_shards = sorted(set(after) - set(before))
    rows = [
        {"build": "v1 (cold)", "records": old, "seconds": round(v1_s, 2), "shards": len(v1["shards"]),
         "downloaded": v1["last_run"]["from_network"], "from_cache": v1["last_run"]["from_cache"]},
        {"build": "v2 incremental", "records": args.records, "seconds": round(inc_s, 2),
         "shards": len(inc["shards"]), "downloaded": inc["last_run"]["from_network"],
         "from_cache": inc["last_run"]["from_cache"]},
        {"build": "v2 full rebuild", "records": args.records, "seconds": round(full_s, 2),
         "shards": len(full["shards"]), "downloaded": full["last_run"]["from_network"],
         "from_cache": full["last_run"]["from_cache"]},
    ]  # fmt: skip
    for row, manifest in zip(rows, (v1, inc, full), strict=True):  # tars this build wrote
        row["mb_written"] = round(sum(s["bytes"] for s in manifest["shards"]
                                      if s["version"] == manifest["version"]) / 2**20, 1)  # fmt: skip
        row["plan_s"] = manifest["last_run"]["plan_seconds"]
    print_table(
        rows, ["build", "records", "seconds", "plan_s", "shards", "mb_written", "downloaded", "from_cache"]
    )
    same = inc["accounting"]["sharded"] == full["accounting"]["sharded"]
    result = {
        "records_v1": old,
        "records_v2": args.records,
        "processes": args.processes,
        "threads": args.threads,
        "shard_samples": SHARD_SAMPLES,
        "builds": rows,
        "speedup_incremental_vs_full": round(full_s / inc_s, 2),
        "v1_shards_rewritten": len(rewritten),
        "new_shards": len(new_shards),
        "incremental": inc["last_run"]["incremental"],
        "same_sample_count_as_full": same,
        "soft_label_rows_recomputed": SOFT_LABELS_NOTE,
    }
    print(
        f"incremental {inc_s:.1f} s vs full rebuild {full_s:.1f} s: {full_s / inc_s:.1f}x; "
        f"v1 shards rewritten {len(rewritten)}, new shards {len(new_shards)}; same samples as full: {same}"
    )
    publish("incremental", result, lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
