"""Sharder benchmark, in one run against one loopback image server (a separate process):

1. Flora vs img2dataset 1.47 on the same URL list (webdataset output, shorter side resized to 256
   without upscaling, JPEG quality 90, 3 retries, same process and thread counts): images/s.
2. Flora rebuilding from a warm cache vs the cold build: time ratio.
3. Flora's peak memory at 10k vs 100k records: ratio (main process and the largest worker).

URLs are ``/img/<file>?variant=<i>``: the server inserts a JPEG comment naming ``i``, so every URL
is a distinct image (distinct bytes, no content dedup) drawn from a few hundred rendered files.
Resizing uses Flora's ``box`` filter, the closest to img2dataset's OpenCV ``INTER_AREA``.

    python -m benchmarks.sharder [--urls 6000] [--scale 10000 100000] [--img2dataset PATH]

``make bench-sharder`` installs img2dataset into its own venv (.venv-img2dataset: its pins clash
with the main environment) and runs this. Writes ``benchmarks/results/sharder.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.catalog import run_child
from benchmarks.results import print_table, write_result
from flora.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SHORTER_SIDE, QUALITY, RETRIES, SHARD_SAMPLES = 256, 90, 3, 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """The sample world's image server over ``root`` (no faults) in a child process on a free loopback
    port, once it accepts connections; returns it (terminate it when done) and its base URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "world", "serve", "--root", str(root), "--port", str(port), "--no-faults"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):  # wait until it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def make_images(root: Path, n_files: int) -> list[str]:
    """Renders ``n_files`` sample-world photos (varied sizes, ~500x375 typical) under root/images/img."""
    from world import plan_image, render_image, species_names

    names = [n for n, *_ in species_names(40)]
    folder = root / "images" / "img"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        plan = plan_image("iNaturalist", i, seed=7)
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            path.write_bytes(
                render_image(names[i % len(names)], plan.variant, seed=7, size=(plan.width, plan.height))
            )
        paths.append(f"img/{path.name}")
    return paths


def write_splits(root: Path, base_url: str, paths: list[str], n: int) -> Path:
    """A catalog of ``n`` records (distinct URL variants) and its splits, as Flora's input."""
    from sharding.catalog import run_catalog
    from sharding.config import CatalogConfig

    src = root / f"catalog_{n}.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(n):
            path = paths[i % len(paths)]
            fh.write(
                json.dumps(
                    {
                        "plant_id": i % 40,
                        "latin_name": f"Species s{i % 40:02d}",
                        "image_url": f"{base_url}/{path}?variant={i}",
                        "license": "cc0",
                        "country": "ES",
                    }
                )
                + "\n"
            )
    out = root / f"splits_{n}"
    run_catalog(str(src), out, CatalogConfig(progress=False))
    return out


def flora(splits: Path, out: Path, cache: Path, processes: int, threads: int) -> tuple[float, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "build",
        "--splits",
        str(splits),
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--no-progress",
        "--allow-network",
        "127.0.0.1/32",
        "--processes",
        str(processes),
        f"download.threads={threads}",
        f"download.retries={RETRIES}",
        f"images.resize_shorter_side={SHORTER_SIDE}",
        "images.resample=box",
        f"images.jpeg_quality={QUALITY}",
        f"shards.max_samples={SHARD_SAMPLES}",
    ]
    seconds, peak, _ = run_child("-m", "sharding", args)
    return seconds, peak, json.loads((out / "manifest.json").read_text())


def img2dataset(exe: Path, urls: Path, out: Path, processes: int, threads: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(exe),
        "--url_list",
        str(urls),
        "--input_format",
        "txt",
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--image_size",
        str(SHORTER_SIDE),
        "--resize_mode",
        "keep_ratio",
        "--resize_only_if_bigger",
        "True",
        "--encode_quality",
        str(QUALITY),
        "--retries",
        str(RETRIES),
        "--timeout",
        "10",
        "--number_sample_per_shard",
        str(SHARD_SAMPLES),
        "--distributor",
        "multiprocessing",
        "--enable_wandb",
        "False",
    ]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {proc.stderr[-2000:]}")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=6000, help="URLs for the Flora vs img2dataset run")
    parser.add_argument("--files", type=int, default=400, help="distinct rendered images behind the URLs")
    parser.add_argument(
        "--scale", type=int, nargs=2, default=[10_000, 100_000], help="records for the memory run"
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument(
        "--img2dataset", type=Path, default=REPO / ".venv-img2dataset" / "bin" / "img2dataset"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "sharder")
    args = parser.parse_args(argv)

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    paths = make_images(root, args.files)
    server, base = start_server(root)
    try:
        rows, result = [], {"benchmark": "sharder", "command": "python -m benchmarks.sharder"}
        # 1. Flora vs img2dataset on the same URL list
        splits = write_splits(root, base, paths, args.urls)
        urls = root / "urls.txt"
        urls.write_text("".join(r["image_url"] + "\n" for r in read_jsonl(splits / "dataset_splits.jsonl")))
        if args.img2dataset.exists():
            i2d_s, i2d_ok = img2dataset(args.img2dataset, urls, root / "i2d", args.processes, args.threads)
            rows.append(
                {
                    "run": "img2dataset 1.47 (baseline)",
                    "images": i2d_ok,
                    "seconds": i2d_s,
                    "img_per_s": i2d_ok / i2d_s,
                }
            )
        else:
            print(f"img2dataset not found at {args.img2dataset}: `make bench-sharder` installs it")
        cache = root / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        cold_s, cold_peak, m = flora(splits, root / "flora_cold", cache, args.processes, args.threads)
        n_ok = m["accounting"]["sharded"]
        rows.append(
            {
                "run": "Flora cold (downloads, with LMDB cache)",
                "images": n_ok,
                "seconds": cold_s,
                "img_per_s": n_ok / cold_s,
            }
        )
        warm_s, _, m2 = flora(splits, root / "flora_warm", cache, args.processes, args.threads)
        rows.append(
            {
                "run": "Flora warm (rebuild from cache)",
                "images": m2["accounting"]["sharded"],
                "seconds": warm_s,
                "img_per_s": m2["accounting"]["sharded"] / warm_s,
            }
        )
        assert m2["last_run"]["from_network"] == 0, "a warm rebuild must not touch the network"
        base_rate = rows[0]["img_per_s"] if args.img2dataset.exists() else None
        for row in rows:
            row["vs_img2dataset"] = row["img_per_s"] / base_rate if base_rate else None
        print_table(rows, ["run", "images", "seconds", "img_per_s", "vs_img2dataset"])
        result["flora_vs_img2dataset"] = rows
        result["warm_vs_cold"] = cold_s / warm_s
        print(f"warm rebuild {cold_s / warm_s:.1f}x faster than the cold build")

        # 2 and 3 at scale: cold build, warm rebuild, peak memory
        mem = []
        for n in args.scale:
            sp = write_splits(root, base, paths, n)
            cache_n = root / f"cache_{n}"
            shutil.rmtree(cache_n, ignore_errors=True)
            seconds, peak, man = flora(sp, root / f"flora_{n}", cache_n, args.processes, args.threads)
            warm, _, _ = flora(sp, root / f"flora_{n}_warm", cache_n, args.processes, args.threads)
            run = man["last_run"]
            mem.append(
                {
                    "records": n,
                    "cold_s": seconds,
                    "warm_s": warm,
                    "warm_vs_cold": seconds / warm,
                    "img_per_s": man["accounting"]["sharded"] / seconds,
                    "main_peak_mib": peak,
                    "worker_peak_mib": run["worker_peak_rss_mib"],
                    "worker_anon_mib": run["worker_anon_rss_mib"],
                    "worker_file_mib": run["worker_file_rss_mib"],
                }
            )
            for path in (cache_n, root / f"flora_{n}", root / f"flora_{n}_warm"):
                shutil.rmtree(path, ignore_errors=True)
        cols = [
            "records",
            "cold_s",
            "warm_s",
            "warm_vs_cold",
            "img_per_s",
            "main_peak_mib",
            "worker_peak_mib",
            "worker_anon_mib",
            "worker_file_mib",
        ]
        print_table(mem, cols)
        result["scale"] = mem
        for key in ("main_peak_mib", "worker_peak_mib", "worker_anon_mib"):
            result[f"memory_ratio_{key}"] = mem[1][key] / mem[0][key]
        print(
            f"peak RSS {args.scale[1]} vs {args.scale[0]}: main {result['memory_ratio_main_peak_mib']:.2f}x, "
            f"worker {result['memory_ratio_worker_peak_mib']:.2f}x (anonymous memory at chunk end: "
            f"{result['memory_ratio_worker_anon_mib']:.2f}x)"
        )
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        result["settings"] = {
            "processes": args.processes,
            "threads": args.threads,
            "shorter_side": SHORTER_SIDE,
            "urls": args.urls,
            "files": args.files,
        }
        result["targets"] = {"vs_img2dataset_min": 1.5, "warm_vs_cold_min": 10, "memory_ratio_max": 1.2}
        print(f"wrote {write_result('sharder', result)}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
