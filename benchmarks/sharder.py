"""Sharder benchmark, in one run against one loopback image server (a separate process):

1. Flora vs img2dataset 1.47 on the same URL list (webdataset output, shorter side resized to 256
   without upscaling, JPEG quality 90, 3 retries, same process and thread counts): images/s, each
   tool ``--runs`` times, interleaved (img2dataset, Flora, img2dataset, Flora, ...; Flora cold each
   time, from an empty cache), on two image sets: ``500`` (today's sample-world photos, ~500x375
   typical, long sides 200-1000) and ``mix`` (50% 500 px, 35% 1024 px, 15% 2048 px long side, 4:3,
   what iNaturalist's ``medium``, ``large`` and ``original`` links serve). Every run is reported, and
   the median of the per-pair ratios.
2. Flora rebuilding from a warm cache vs the cold build: time ratio.
3. Where the time goes (benchmarks/sharder_stages.py): both tools' CPU per image, stage by stage, on
   one core, with the decode-only floor; and the DCT-scale table (decode cost of libjpeg-turbo's M/8
   scales, pixel difference against today's path) when ``simplejpeg`` is importable.
4. Flora's peak memory at 10k vs 100k records: ratio (main process and the largest worker); skipped
   with ``--no-scale``.

URLs are ``/img/<file>?variant=<i>``: the server inserts a JPEG comment naming ``i``, so every URL
is a distinct image (distinct bytes, no content dedup) drawn from a few hundred rendered files.
Resizing uses Flora's ``box`` filter, the closest to img2dataset's OpenCV ``INTER_AREA``.

    python -m benchmarks.sharder [--urls 6000] [--runs 3] [--sets 500 mix] [--breakdown-urls 2000]
        [--scale 10000 100000 | --no-scale] [--img2dataset PATH]

``make bench-sharder`` installs img2dataset into its own venv (.venv-img2dataset: its pins clash
with the main environment) and runs this. Writes ``benchmarks/results/sharder.json`` and
``sharder.png`` (the per-image breakdown as stacked bars, and every run's images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import sharder_stages
from benchmarks.catalog import run_child
from benchmarks.results import command_line, print_table, publish
from flora.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SHORTER_SIDE, QUALITY, RETRIES, SHARD_SAMPLES = 256, 90, 3, 1000
#: The ``mix`` set's long sides, per 20 files: 10 x 500 (iNaturalist ``medium``), 7 x 1024 (``large``),
#: 3 x 2048 (``original``, capped there): 50 / 35 / 15%.
MIX_LONG_SIDES = (500,) * 10 + (1024,) * 7 + (2048,) * 3
#: img2dataset checks PyPI for a newer albumentations at every import unless told not to.
I2D_ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


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


def make_images(root: Path, n_files: int, image_set: str = "500") -> list[str]:
    """Renders ``n_files`` sample-world photos under root/images/img (set ``500``: varied sizes, ~500x375
    typical) or root/images/mix (set ``mix``: ``MIX_LONG_SIDES``, 4:3, every other one portrait)."""
    from world import plan_image, render_image, species_names

    names = [n for n, *_ in species_names(40)]
    sub = "img" if image_set == "500" else image_set
    folder = root / "images" / sub
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        plan = plan_image("iNaturalist", i, seed=7)
        if image_set == "500":
            size = (plan.width, plan.height)
        else:
            long = MIX_LONG_SIDES[i % len(MIX_LONG_SIDES)]
            size = (long, long * 3 // 4) if i % 2 == 0 else (long * 3 // 4, long)
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            path.write_bytes(render_image(names[i % len(names)], plan.variant, seed=7, size=size))
        paths.append(f"{sub}/{path.name}")
    return paths


def write_splits(root: Path, base_url: str, paths: list[str], n: int, tag: str = "") -> Path:
    """A catalog of ``n`` records (distinct URL variants) and its splits, as Flora's input."""
    from flora.sharding.catalog.run import run_catalog
    from flora.sharding.config import CatalogConfig

    src = root / f"catalog{tag}_{n}.jsonl"
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
    out = root / f"splits{tag}_{n}"
    run_catalog(str(src), out, CatalogConfig(progress=False))
    return out


#: The build settings both measurements of Flora use (the shard and image settings of the comparison).
BUILD_SETTINGS = [
    "--no-progress",
    "--allow-network",
    "127.0.0.1/32",
    f"download.retries={RETRIES}",
    f"images.resize_shorter_side={SHORTER_SIDE}",
    "images.resample=box",
    f"images.jpeg_quality={QUALITY}",
    f"shards.max_samples={SHARD_SAMPLES}",
]


def converted(manifest: dict) -> int:
    """Images a build downloaded (or read from its cache), validated and converted: the sharded ones
    and the content duplicates finalize dropped (the rendered files behind the URLs repeat, so their
    variants are near-duplicates), as img2dataset's ``successes`` count them."""
    accounting = manifest["accounting"]
    return accounting["sharded"] + accounting["content_duplicates"]


def flora(splits: Path, out: Path, cache: Path, processes: int, threads: int) -> tuple[float, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    args = ["build", "--splits", str(splits), "--out", str(out), "--cache", str(cache)]
    flags = [a for a in BUILD_SETTINGS if "=" not in a]
    overrides = [a for a in BUILD_SETTINGS if "=" in a]
    args += [*flags, "--processes", str(processes), *overrides, f"download.threads={threads}"]
    seconds, peak, _ = run_child("-m", "flora.sharding", args)
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
    proc = subprocess.run(argv, capture_output=True, text=True, env=I2D_ENV)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {proc.stderr[-2000:]}")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def compare(args, root: Path, base: str, image_set: str) -> tuple[list[dict], dict]:
    """``args.runs`` interleaved runs of img2dataset and cold Flora on one image set, then a warm
    rebuild of Flora; returns every run's row and the set's summary."""
    paths = make_images(root, args.files, image_set)
    splits = write_splits(root, base, paths, args.urls, tag=f"_{image_set}")
    urls = root / f"urls_{image_set}.txt"
    urls.write_text("".join(r["image_url"] + "\n" for r in read_jsonl(splits / "dataset_splits.jsonl")))
    rows, cache = [], root / "cache"
    for run in range(1, args.runs + 1):
        if args.img2dataset.exists():
            seconds, ok = img2dataset(args.img2dataset, urls, root / "i2d", args.processes, args.threads)
            rows.append(
                {
                    "set": image_set,
                    "tool": "img2dataset 1.47",
                    "run": run,
                    "images": ok,
                    "seconds": seconds,
                    "img_per_s": ok / seconds,
                }
            )
        shutil.rmtree(cache, ignore_errors=True)
        seconds, _, m = flora(splits, root / "flora_cold", cache, args.processes, args.threads)
        ok = converted(m)
        rows.append(
            {
                "set": image_set,
                "tool": "Flora cold",
                "run": run,
                "images": ok,
                "seconds": seconds,
                "img_per_s": ok / seconds,
            }
        )
    warm_s, _, m2 = flora(splits, root / "flora_warm", cache, args.processes, args.threads)
    assert m2["last_run"]["from_network"] == 0, "a warm rebuild must not touch the network"
    rows.append(
        {
            "set": image_set,
            "tool": "Flora warm (rebuild from the cache)",
            "run": 1,
            "images": converted(m2),
            "seconds": warm_s,
            "img_per_s": converted(m2) / warm_s,
        }
    )
    cold = [r for r in rows if r["tool"] == "Flora cold"]
    i2d = [r for r in rows if r["tool"].startswith("img2dataset")]
    pairs = [f["img_per_s"] / b["img_per_s"] for f, b in zip(cold, i2d, strict=False)]
    for f, ratio in zip(cold, pairs, strict=False):
        f["vs_img2dataset"] = ratio
    summary = {
        "set": image_set,
        "flora_vs_img2dataset_median": statistics.median(pairs) if pairs else None,
        "flora_vs_img2dataset_runs": pairs,
        "flora_img_per_s_median": statistics.median(r["img_per_s"] for r in cold),
        "img2dataset_img_per_s_median": statistics.median(r["img_per_s"] for r in i2d) if i2d else None,
        "warm_vs_cold": statistics.median(r["seconds"] for r in cold) / warm_s,
        "splits": splits,
        "urls": urls,
    }
    for path in (root / "flora_cold", root / "flora_warm", root / "i2d"):
        shutil.rmtree(path, ignore_errors=True)
    return rows, summary


def stage_breakdown(args, root: Path, server: subprocess.Popen, summary: dict) -> list[dict]:
    """Both tools' per-image CPU on one core for one image set (benchmarks/sharder_stages.py)."""
    work = root / "stages"
    work.mkdir(parents=True, exist_ok=True)
    splits, urls = sharder_stages.sample(summary["splits"], args.breakdown_urls, work)
    n = args.breakdown_urls
    core, everything = sharder_stages.cores(server.pid)
    try:
        build = [a for a in BUILD_SETTINGS if "=" in a]
        flora_stage = sharder_stages.flora_stages(splits, n, core, work, build)
        flora_total = sharder_stages.flora_total(splits, n, core, work, BUILD_SETTINGS)
        i2d = None
        if args.img2dataset.exists():
            settings = {
                "image_size": SHORTER_SIDE,
                "quality": QUALITY,
                "retries": RETRIES,
                "shard_samples": SHARD_SAMPLES,
            }
            python = args.img2dataset.with_name("python")
            i2d = sharder_stages.img2dataset_breakdown(python, urls, n, core, work, settings)
        floor = sharder_stages.floor_ms(urls, root / "images", n, core)
    finally:
        os.sched_setaffinity(server.pid, everything)
    label = {"500": "500 set", "mix": "mix set"}.get(summary["set"], summary["set"])
    return sharder_stages.breakdown(flora_stage, flora_total, i2d, floor, label)


def scale_runs(args, root: Path, base: str) -> list[dict]:
    """Cold build, warm rebuild and peak memory at each of ``args.scale`` records."""
    paths = make_images(root, args.files)
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
    return mem


def dct_scales(root: Path, files: int) -> list[dict]:
    """The DCT-scale table on a few files of each long side (sharder_stages.scale_table)."""
    from world import render_image, species_names

    names = [n for n, *_ in species_names(40)]
    datas = {}
    for long in (500, 1024, 2048):
        size = (long, long * 3 // 4)
        datas[f"{size[0]}x{size[1]}"] = [render_image(names[i], i, seed=7, size=size) for i in range(files)]
    return sharder_stages.scale_table(datas, SHORTER_SIDE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=6000, help="URLs per set for Flora vs img2dataset")
    parser.add_argument("--files", type=int, default=400, help="distinct rendered images behind the URLs")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool per set, interleaved")
    parser.add_argument("--sets", nargs="+", default=["500", "mix"], choices=["500", "mix"])
    parser.add_argument("--breakdown-urls", type=int, default=2000, help="images of the per-stage breakdown")
    parser.add_argument(
        "--scale", type=int, nargs=2, default=[10_000, 100_000], help="records for the memory run"
    )
    parser.add_argument("--no-scale", action="store_true", help="skip the memory run")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument(
        "--img2dataset", type=Path, default=REPO / ".venv-img2dataset" / "bin" / "img2dataset"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "sharder")
    args = parser.parse_args(argv)
    if not args.img2dataset.exists():
        print(f"img2dataset not found at {args.img2dataset}: `make bench-sharder` installs it")

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    for image_set in args.sets:  # rendered before the server starts (the mix set takes ~1 min once)
        make_images(root, args.files, image_set)
    server, base = start_server(root)
    started, load_at_start = time.time(), list(os.getloadavg())
    try:
        result = {
            "benchmark": "sharder",
            "command": command_line("benchmarks.sharder", argv),
        }
        runs, summaries, stages = [], [], []
        for image_set in args.sets:  # 1 and 2: interleaved runs, warm rebuild
            rows, summary = compare(args, root, base, image_set)
            runs += rows
            summaries.append(summary)
        print_table(runs, ["set", "tool", "run", "images", "seconds", "img_per_s", "vs_img2dataset"])
        for s in summaries:
            ratio = s["flora_vs_img2dataset_median"]
            shown = "n/a" if ratio is None else f"{ratio:.2f}x"
            print(
                f"{s['set']} set: Flora cold vs img2dataset, median of {args.runs} interleaved pairs: "
                f"{shown}; warm rebuild {s['warm_vs_cold']:.1f}x faster than cold"
            )
        for s in summaries:  # 3: where the time goes
            stages += stage_breakdown(args, root, server, s)
        print_table(stages, ["set", "tool", *sharder_stages.STAGES, "total", "floor (decode only)"])
        scales = dct_scales(root, files=8)
        if scales:
            print_table(scales, ["set", "scale", "decode_ms", "psnr_db_min", "max_abs_diff"])
        result["runs"] = runs
        result["sets"] = [{k: v for k, v in s.items() if k not in ("splits", "urls")} for s in summaries]
        result["breakdown_ms_per_image_one_core"] = stages
        result["dct_scales"] = scales
        if not args.no_scale:  # 4: memory at scale
            mem = scale_runs(args, root, base)
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
        result["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # other work on the machine shows here (1, 5 and 15 minute load averages)
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        }
        result["settings"] = {
            "processes": args.processes,
            "threads": args.threads,
            "shorter_side": SHORTER_SIDE,
            "urls": args.urls,
            "files": args.files,
            "runs": args.runs,
            "breakdown_urls": args.breakdown_urls,
            "minutes": round((time.time() - started) / 60, 1),
        }
        result["targets"] = {
            "vs_img2dataset_500_min": 2.0,
            "vs_img2dataset_mix_min": 3.0,
            "warm_vs_cold_min": 10,
            "memory_ratio_max": 1.2,
        }
        publish("sharder", result, lambda png: sharder_stages.plot(stages, runs, png))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
