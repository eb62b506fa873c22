"""Decode memory against the decode budget: a build process's peak RSS on large images, budget on and off.

Every measurement runs in a fresh child process (peak RSS: the child's ``VmHWM``, the same figure a
chunk marker reports) with ``MALLOC_ARENA_MAX=2``, as the build sets for its workers:

1. ``kinds``: for one 4000x4000 image of each kind (RGB, L, transparent palette, RGBA and 16-bit PNG;
   RGB JPEG stored as is, progressive, EXIF-rotated and CMYK JPEG; WebP), the budget's estimate
   (``budget.decode_cost``) against the measured peak of ``process_image`` alone, above the child's
   baseline: the estimate must be the larger.
2. ``threads``: ``--png`` distinct 7999x7999 RGB PNGs of ~200 KiB each (flat blocks that compress
   small) and ``--jpeg`` distinct 12 MP JPEGs (half EXIF-rotated, half progressive), all through
   ``process_image`` on a 64-thread pool (a build worker's ``obtain`` less the download), production
   image settings (no resize), without a budget (what a build did before) and with each ``--budgets``
   MiB. A budget below one PNG's estimate makes every PNG run alone.
3. ``build`` (``--no-build`` skips it): the same files served on loopback (each PNG under two names,
   so more big images share a chunk; the second copies end as content duplicates), catalogued and built
   by ``flora build`` with 2 processes x 32 threads, ``decode_budget_mib`` 512 against 1 TiB (no limit
   in practice): the manifest's ``worker_peak_rss_mib`` (the largest worker's peak) and accounting.

    python -m benchmarks.decode_memory [--png 6] [--jpeg 12] [--budgets 2048 1024 512 256] [--no-build]

The images are made once under ``benchmarks/out/decode_memory/`` (a few seconds each). Writes
``benchmarks/results/decode_memory.json`` and ``decode_memory.png`` (peak above the baseline per
budget, with the budget line; the estimate against the measured peak per kind).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.results import REPO, command_line, print_table, publish, pyplot, save_figure

OUT = REPO / "benchmarks" / "out" / "decode_memory"
MIB = 2**20
#: The issue's originals: 7999x7999 PNGs of ~200 KiB (just under images.max_pixels, 64 MP).
PNG_SIDE = 7999
#: A 12 MP camera photo.
JPEG_SIZE = (4000, 3000)
KIND_SIDE = 4000
THREADS = 64
#: glibc arenas of a build worker (sharding/build/distribute.py sets it for its workers).
ARENAS = "2"
#: The build comparison's budgets in MiB: a bound, and one no machine reaches (no limit in practice).
BUILD_BUDGETS = (512, 1 << 20)
BUILD_PROCESSES, BUILD_THREADS = 2, 32
BUILD_PNG_COPIES = 2
#: Builds per budget, interleaved: how many big images a chunk decodes at once depends on download timing.
BUILD_RUNS = 2


# ------------------------------------------------------------------------------------------- images
def _blocks(side: tuple[int, int], seed: int) -> np.ndarray:
    """Flat diagonal bands of ``seed``-dependent width (compress to little in a PNG), uint8 h x w."""
    w, h = side
    k = 29 + seed
    cols = (np.arange(w) // k).astype(np.uint8)
    rows = ((np.arange(h) // k) + seed).astype(np.uint8)
    return cols[None, :] + rows[:, None]


def _rgb(base: np.ndarray) -> Image.Image:
    return Image.fromarray(np.stack([base, base * np.uint8(3), 255 - base], -1))


def _photo_like(side: tuple[int, int], seed: int) -> Image.Image:
    """Bands plus noise: JPEG sizes and decode costs of a real photo (~0.4 bytes a pixel at q90)."""
    rng = np.random.default_rng(seed)
    base = _blocks(side, seed).astype(np.int16)
    noise = rng.integers(-24, 24, size=(side[1], side[0], 1), dtype=np.int16)
    rgb = np.stack([base, (base * 3) % 256, 255 - base], -1) + noise
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def _rotated(img: Image.Image, path: Path) -> Path:
    exif = img.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    return _save(img, path, "JPEG", quality=90, exif=exif)


def make_set(folder: Path, n_png: int, n_jpeg: int) -> list[Path]:
    """The threads part's files (made once): distinct big PNGs, then distinct 12 MP JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_png):
        path = folder / f"big-{i:02d}.png"
        if not path.is_file():
            _save(_rgb(_blocks((PNG_SIDE, PNG_SIDE), i)), path, "PNG")
        files.append(path)
    for i in range(n_jpeg):
        path = folder / f"photo-{i:02d}.jpg"
        if not path.is_file():
            img = _photo_like(JPEG_SIZE, 100 + i)
            _rotated(img, path) if i % 2 == 0 else _save(img, path, "JPEG", quality=90, progressive=True)
        files.append(path)
    return files


def make_kinds(folder: Path) -> dict[str, Path]:
    """One 4000x4000 image per kind (made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    side = (KIND_SIDE, KIND_SIDE)
    base = _blocks(side, 1)
    makers = {
        "PNG RGB": ("rgb.png", lambda p: _save(_rgb(base), p, "PNG")),
        "PNG L": ("l.png", lambda p: _save(Image.fromarray(base), p, "PNG")),
        "PNG P transparent": ("pt.png", lambda p: _save(_rgb(base).quantize(16), p, "PNG", transparency=0)),
        "PNG RGBA": ("rgba.png", lambda p: _save(_rgb(base).convert("RGBA"), p, "PNG")),
        "PNG 16-bit": ("i16.png", lambda p: _save(Image.fromarray(base.astype(np.uint16) * 257), p, "PNG")),
        "JPEG RGB kept": ("rgb.jpg", lambda p: _save(_photo_like(side, 1), p, "JPEG", quality=90)),
        "JPEG progressive": (
            "prog.jpg",
            lambda p: _save(_photo_like(side, 1), p, "JPEG", quality=90, progressive=True),
        ),
        "JPEG rotated": ("rot.jpg", lambda p: _rotated(_photo_like(side, 1), p)),
        "JPEG CMYK": (
            "cmyk.jpg",
            lambda p: _save(_photo_like(side, 1).convert("CMYK"), p, "JPEG", quality=90),
        ),
        "WebP": ("rgb.webp", lambda p: _save(_photo_like(side, 1), p, "WEBP", quality=80)),
    }
    out = {}
    for kind, (name, make) in makers.items():
        path = folder / name
        if not path.is_file():
            make(path)
        out[kind] = path
    return out


# ------------------------------------------------------------------------------------------ children
def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) * 1024


def _warm_up() -> None:
    """Imports and first-call allocations of the decode path, before the baseline is read."""
    from flora.sharding.images.convert import ImageConfig, process_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    process_image(buf.getvalue(), ImageConfig())


def child_kind(path: str) -> dict:
    """One image alone: the estimate and the measured peak above the baseline."""
    from flora.sharding.images.budget import decode_cost
    from flora.sharding.images.convert import ImageConfig, _plan, process_image

    _warm_up()
    data = Path(path).read_bytes()
    cfg = ImageConfig()
    estimate = decode_cost(_plan(Image.open(io.BytesIO(data)), data, cfg).memory)
    baseline = _status_bytes("VmRSS")
    process_image(data, cfg)
    return {"estimate_mib": estimate / MIB, "peak_mib": (_status_bytes("VmHWM") - baseline) / MIB}


def child_threads(budget: str, paths: list[str]) -> dict:
    """Every file through ``process_image`` on a 64-thread pool, with the budget (``off``: none)."""
    from concurrent.futures import ThreadPoolExecutor

    from flora.sharding.images.budget import DecodeBudget, decode_cost
    from flora.sharding.images.convert import ImageConfig, ImageError, _plan, process_image

    _warm_up()
    cfg = ImageConfig()
    blobs = [Path(p).read_bytes() for p in paths]
    estimates = [decode_cost(_plan(Image.open(io.BytesIO(b)), b, cfg).memory) for b in blobs]
    limit = None if budget == "off" else DecodeBudget(int(budget) * MIB)
    baseline = _status_bytes("VmRSS")

    def one(data: bytes) -> str:
        try:
            process_image(data, cfg, budget=limit)
        except ImageError as exc:
            return exc.reason
        return "ok"

    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(one, blobs))
    seconds = time.perf_counter() - started
    return {
        "baseline_mib": baseline / MIB,
        "peak_rss_mib": _status_bytes("VmHWM") / MIB,
        "peak_above_baseline_mib": (_status_bytes("VmHWM") - baseline) / MIB,
        "seconds": seconds,
        "ok": outcomes.count("ok"),
        "failed": len(outcomes) - outcomes.count("ok"),
        "largest_estimate_mib": max(estimates) / MIB,
        "sum_of_estimates_mib": sum(estimates) / MIB,
        "budget_stats": limit.stats() if limit is not None else None,
    }


def _run_child(*args: str) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": ARENAS}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_memory", "--child", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"decode_memory child {args[:2]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- parts
def measure_kinds(kinds: dict[str, Path]) -> list[dict]:
    rows = []
    for kind, path in kinds.items():
        got = _run_child("kind", str(path))
        rows.append(
            {"kind": kind, **got, "estimate_over_peak": got["estimate_mib"] / max(got["peak_mib"], 1e-9)}
        )
    return rows


def measure_threads(files: list[Path], budgets: list[int]) -> list[dict]:
    rows = []
    for budget in ["off", *map(str, budgets)]:
        got = _run_child("threads", budget, *map(str, files))
        stats = got.pop("budget_stats") or {}
        rows.append(
            {
                "budget_mib": budget,
                **got,
                "reserved_peak_mib": stats.get("peak", 0) / MIB if stats else None,
                "waited": stats.get("waited"),
                "alone": stats.get("alone"),
            }
        )
    return rows


def measure_build(files: list[Path], work: Path) -> list[dict]:
    """``flora build`` over the files served on loopback (each PNG under ``BUILD_PNG_COPIES`` names: more
    big images per chunk; the copies end as content duplicates), once per budget in ``BUILD_BUDGETS``."""
    from benchmarks.photos import write_catalog
    from flora.config import load_config
    from flora.sharding.catalog.run import run_catalog
    from flora.sharding.config import CatalogConfig
    from world import ImageServer

    served = work / "images"
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir(parents=True)
    for f in files:
        for copy in range(BUILD_PNG_COPIES if f.suffix == ".png" else 1):
            os.link(f, served / f"{f.stem}-{copy}{f.suffix}")
    rows = []
    with ImageServer(served) as server:
        write_catalog(sorted(served.iterdir()), served, server.base_url, work / "catalog.jsonl", classes=4)
        shutil.rmtree(work / "splits", ignore_errors=True)
        run_catalog(
            str(work / "catalog.jsonl"), work / "splits", load_config(CatalogConfig, None, ["progress=false"])
        )
        for run, budget in enumerate(BUILD_BUDGETS * BUILD_RUNS):  # interleaved
            out = work / f"shards-{budget}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [sys.executable, "-m", "flora.sharding", "build", "--splits", str(work / "splits")]
            argv += ["--out", str(out), "--processes", str(BUILD_PROCESSES), "--no-progress"]
            argv += [f"download.threads={BUILD_THREADS}", "download.allow_networks=[127.0.0.1/32]"]
            argv += ["images.resize_shorter_side=null", "near_duplicates.enabled=false"]
            argv += [f"decode_budget_mib={budget}"]
            started = time.perf_counter()
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"flora build failed ({proc.returncode}): {proc.stderr[-2000:]}")
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            rows.append(
                {
                    "decode_budget_mib": budget,
                    "run": run // len(BUILD_BUDGETS) + 1,
                    "worker_peak_rss_mib": _find(manifest, "worker_peak_rss_mib"),
                    "seconds": time.perf_counter() - started,
                    "accounting": manifest.get("accounting", {}),
                }
            )
    return rows


def _find(tree, key: str):
    """The first value of ``key`` anywhere in a nested JSON object (the manifest's layout aside)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------------- chart
def chart(threads: list[dict], kinds: list[dict], build: list[dict], path: Path) -> None:
    plt = pyplot()
    panels = 3 if build else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), width_ratios=[1.2, 1.2, 0.6][:panels])
    left, right = axes[0], axes[1]
    labels = ["no budget" if r["budget_mib"] == "off" else f"{r['budget_mib']} MiB" for r in threads]
    left.bar(
        labels,
        [r["peak_above_baseline_mib"] for r in threads],
        color="#4a7f3b",
        label="peak RSS above baseline",
    )
    for i, r in enumerate(threads):
        if r["budget_mib"] != "off":
            bound = max(int(r["budget_mib"]), r["largest_estimate_mib"])
            left.hlines(
                bound,
                i - 0.4,
                i + 0.4,
                colors="#b03a2e",
                label="max(budget, largest image)" if i == 1 else None,
            )
    left.set_ylabel("MiB (lower is better)")
    left.set_title(
        f"process_image, {THREADS} threads, {threads[0]['ok'] + threads[0]['failed']} large images"
    )
    left.legend(fontsize=7)
    names = [r["kind"] for r in kinds]
    y = np.arange(len(names))
    right.barh(y - 0.2, [r["peak_mib"] for r in kinds], 0.4, color="#4a7f3b", label="measured peak")
    right.barh(y + 0.2, [r["estimate_mib"] for r in kinds], 0.4, color="#9ab87a", label="budget's estimate")
    right.set_yticks(y, names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("MiB for one 4000x4000 image")
    right.set_title("estimate >= measured, per kind")
    right.legend(fontsize=7)
    if build:
        ax = axes[2]
        names = [
            f"{r['decode_budget_mib']} MiB" if r["decode_budget_mib"] < 1 << 20 else "no limit" for r in build
        ]
        names = [f"{name}\nrun {r['run']}" for name, r in zip(names, build, strict=True)]
        ax.bar(names, [r["worker_peak_rss_mib"] for r in build], color="#4a7f3b")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("largest worker's peak RSS, MiB")
        ax.set_title(f"flora build, {BUILD_PROCESSES} x {BUILD_THREADS} threads", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=int, default=6, help="distinct 7999x7999 PNGs")
    parser.add_argument("--jpeg", type=int, default=12, help="distinct 12 MP JPEGs")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 1024, 512, 256], help="MiB")
    parser.add_argument("--no-build", action="store_true", help="skip the flora build comparison")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, *rest = args.child
        got = child_kind(rest[0]) if mode == "kind" else child_threads(rest[0], rest[1:])
        print(json.dumps(got))
        return 0

    from flora.sharding.images.budget import budget_bytes, machine_memory_bytes

    started = time.perf_counter()
    kinds = measure_kinds(make_kinds(OUT / "kinds"))
    print_table(kinds, ["kind", "estimate_mib", "peak_mib", "estimate_over_peak"])
    files = make_set(OUT / "set", args.png, args.jpeg)
    threads = measure_threads(files, args.budgets)
    columns = [
        "budget_mib",
        "peak_above_baseline_mib",
        "peak_rss_mib",
        "reserved_peak_mib",
        "alone",
        "waited",
    ]
    print_table(threads, [*columns, "ok", "failed", "seconds"])
    build = [] if args.no_build else measure_build(files, OUT / "build")
    if build:
        print_table(build, ["decode_budget_mib", "run", "worker_peak_rss_mib", "seconds"])
    result = {
        "command": command_line("benchmarks.decode_memory", argv),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(machine_memory_bytes() / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "threads": THREADS,
        "malloc_arena_max": int(ARENAS),
        "set": {
            "png": {
                "count": args.png,
                "size": [PNG_SIDE, PNG_SIDE],
                "mean_kib": _mean_kib([f for f in files if f.suffix == ".png"]),
            },
            "jpeg": {
                "count": args.jpeg,
                "size": list(JPEG_SIZE),
                "rotated": (args.jpeg + 1) // 2,
                "progressive": args.jpeg // 2,
                "mean_kib": _mean_kib([f for f in files if f.suffix == ".jpg"]),
            },
        },  # fmt: skip
        "default_budget_mib_2_processes": budget_bytes(None, 2) / MIB,
        "kinds": kinds,
        "threads_runs": threads,
        "build_runs": build,
        "seconds": time.perf_counter() - started,
    }
    publish("decode_memory", result, lambda p: chart(threads, kinds, build, p))
    return 0


def _mean_kib(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / max(1, len(files)) / 1024


if __name__ == "__main__":
    raise SystemExit(main())
