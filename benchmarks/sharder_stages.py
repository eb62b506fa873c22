"""Per-image CPU cost of the sharder and of img2dataset, stage by stage, on one core (benchmarks.sharder).

Both tools are measured over the same URLs of the same loopback server, with the image server pinned to
the other cores:

* **Stages** (one thread pinned to one core, each stage timed with the thread's CPU clock): Flora runs
  the build's own steps in order, as ``job.obtain`` and ``run_chunk`` do: ``Downloader.fetch`` (HTTP),
  ``process_image`` with a ``StageClock`` (open: header, checks, EXIF; decode; orient + colour; resize;
  encode; hashes: SHA-256 and the perceptual hashes), ``ImageCache.put_many`` in batches of
  ``job.PUT_BATCH`` (cache put), ``SampleMeta`` + ``RollingTarWriter.write`` (tar write).
  img2dataset is timed from outside, in its own venv (``img2dataset_stages.py``): ``download_image``
  (urllib), the ``Resizer`` call split into ``cv2.imdecode``, albumentations ``SmallestMaxSize``
  (OpenCV ``INTER_AREA``) and ``cv2.imencode`` (its remainder counts as other image work), SHA-256
  and EXIF (its defaults), ``WebDatasetSampleWriter.write`` (tar and parquet).
* **Total**: the CPU time (user + system, from ``getrusage``) of real runs of the tool over the same
  URLs in one process with 32 threads, pinned to the same core: the run of n images minus the run of
  n / 5, per extra image (start-up and imports cancel out). *Python overhead & rest* is total minus
  the timed stages: thread pool and GIL hand-offs, the tool's own bookkeeping, planning and finalize.
* **Floor**: decoding each downloaded image at its stored size (Pillow, full size) and nothing else.

All over the same seeded random sample of the set's URLs (the splits file is grouped by species, and
the files behind the URLs cycle with the species: its first lines are no sample of the sizes).

Also the DCT-scale table (when ``simplejpeg`` is importable): decode time of libjpeg-turbo at each
M/8 scale, and the PSNR and max abs difference of the resized result against today's path.

Leaves out: the multi-process throughput (benchmarks.sharder), memory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.results import pyplot, save_figure

REPO = Path(__file__).resolve().parents[1]
I2D_SCRIPT = Path(__file__).resolve().parent / "img2dataset_stages.py"
#: Stage columns of the breakdown, in stacking order (ms of one core per image).
STAGES = (
    "http",
    "decode",
    "resize",
    "encode",
    "hashing",
    "other image work",
    "exif",
    "cache put",
    "tar write",
    "python overhead & rest",
)
#: Threads of the one-process total run (the benchmark's setting).
THREADS = 32
#: The total per image is marginal: a run of n images minus a run of n // MARGINAL, per extra image.
MARGINAL = 5
SAMPLE_SEED = 19


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pinned(core: int):
    return lambda: os.sched_setaffinity(0, {core})


def sample(splits: Path, n: int, work: Path) -> tuple[Path, Path]:
    """A seeded random sample of ``n`` records of ``splits``, in random order (so that every prefix is
    a sample too: the splits file is grouped by species, and the files behind the URLs cycle with the
    species), as a splits folder and a URL list."""
    import random

    lines = (splits / "dataset_splits.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    picked = random.Random(SAMPLE_SEED).sample(lines, min(n, len(lines)))
    out = work / "sample_splits"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(splits, out)
    (out / "dataset_splits.jsonl").write_text("".join(picked), encoding="utf-8")
    urls = work / "sample_urls.txt"
    urls.write_text("".join(json.loads(line)["image_url"] + "\n" for line in picked), encoding="utf-8")
    return out, urls


def cores(server_pid: int) -> tuple[int, set[int]]:
    """(the core the measured work runs on, the cores the server gets): the last core for the work."""
    available = sorted(os.sched_getaffinity(0))
    core = available[-1]
    rest = set(available[:-1]) or {core}
    os.sched_setaffinity(server_pid, rest)
    return core, set(available)


def flora_stages(splits: Path, n: int, core: int, work: Path, build_args: list[str]) -> dict[str, float]:
    """ms of one core per image of each of Flora's stages over the first ``n`` records (see the module
    docstring), in a child process pinned to ``core``."""
    out = work / "stages.json"
    code = "import sys; from benchmarks.sharder_stages import _flora_child; _flora_child(*sys.argv[1:])"
    args = [str(splits / "dataset_splits.jsonl"), str(n), str(work), str(out), json.dumps(build_args)]
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True, preexec_fn=_pinned(core))
    return json.loads(out.read_text())


def _flora_child(splits_path: str, n: str, work: str, out: str, build_args: str) -> None:
    from flora.config import load_config
    from flora.sharding.build.job import PUT_BATCH
    from flora.sharding.build.plan import image_fingerprint
    from flora.sharding.build.run import BuildConfig
    from flora.sharding.cache.image_cache import ImageCache
    from flora.sharding.catalog.records import url_key
    from flora.sharding.download.fetch import Downloader
    from flora.sharding.format.schema import SampleMeta, safe_key
    from flora.sharding.format.writer import RollingTarWriter, Sample
    from flora.sharding.images.convert import ImageError, StageClock, process_image

    overrides = [a for a in json.loads(build_args) if "=" in a and not a.startswith("-")]
    cfg = load_config(BuildConfig, None, [*overrides, "download.allow_networks=[127.0.0.1/32]"])
    root = Path(work)
    shutil.rmtree(root / "stage_cache", ignore_errors=True)
    shutil.rmtree(root / "stage_tar", ignore_errors=True)
    cache = ImageCache.from_config(dataclasses.replace(cfg.cache, path=str(root / "stage_cache")))
    writer = RollingTarWriter(root / "stage_tar", "part", cfg.shards.max_samples, cfg.shards.max_bytes)
    prefix = image_fingerprint(cfg.images)
    clock, spent, batch = StageClock(), Counter(), []
    records = []
    with open(splits_path, encoding="utf-8") as fh:
        for line in fh:
            records.append(json.loads(line))
            if len(records) == int(n):
                break
    done = 0
    with Downloader(cfg.download) as downloader:
        for record in records:
            t0 = time.thread_time_ns()
            fetched = downloader.fetch(record["image_url"])
            spent["http"] += time.thread_time_ns() - t0
            if not fetched.ok:
                continue
            try:
                image = process_image(fetched.data, cfg.images, clock=clock)
            except ImageError:
                continue
            t0 = time.thread_time_ns()
            meta = {
                k: getattr(image, k)
                for k in (
                    "sha256",
                    "width",
                    "height",
                    "original_width",
                    "original_height",
                    "original_format",
                    "phash",
                    "phash_crops",
                )
                if hasattr(image, k)
            }
            batch.append((f"{prefix}|{record['image_url']}", image.jpeg, meta))
            if len(batch) >= PUT_BATCH:
                cache.put_many(batch)
                batch = []
            t1 = time.thread_time_ns()
            sample_meta = SampleMeta.from_record(record, record["label"], meta).as_json()
            key = safe_key(url_key(record["image_url"]))
            writer.write(Sample(key=key, jpg=image.jpeg, label=int(record["label"]), meta=sample_meta))
            t2 = time.thread_time_ns()
            spent["cache put"] += t1 - t0
            spent["tar write"] += t2 - t1
            done += 1
        t0 = time.thread_time_ns()
        if batch:
            cache.put_many(batch)
        cache.close()
        spent["cache put"] += time.thread_time_ns() - t0
        t0 = time.thread_time_ns()
        writer.close()
        spent["tar write"] += time.thread_time_ns() - t0
    ns = clock.ns
    stages = {
        "http": spent["http"],
        "decode": ns["decode"],
        "resize": ns["resize"],
        "encode": ns["encode"],
        "hashing": ns["hashes"],
        "other image work": ns["open"] + ns["orient"] + ns["colour"],
        "exif": 0,  # read with the header: in "other image work"
        "cache put": spent["cache put"],
        "tar write": spent["tar write"],
    }
    result = {k: v / max(done, 1) / 1e6 for k, v in stages.items()}
    result["images"] = done
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def flora_total(splits: Path, n: int, core: int, work: Path, build_args: list[str]) -> float:
    """CPU ms per image of real one-process builds (32 threads) on ``core``: the builds of the first
    ``n`` and the first ``n // MARGINAL`` records, difference per extra image (start-up cancels out)."""
    (cpu_n, ok_n), (cpu_s, ok_s) = (_flora_run(splits, k, core, work, build_args) for k in (n, n // MARGINAL))
    return (cpu_n - cpu_s) / max(ok_n - ok_s, 1) * 1000


def _flora_run(splits: Path, n: int, core: int, work: Path, build_args: list[str]) -> tuple[float, int]:
    head = work / "total_splits"
    shutil.rmtree(head, ignore_errors=True)
    shutil.copytree(splits, head)
    lines = (splits / "dataset_splits.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    (head / "dataset_splits.jsonl").write_text("".join(lines), encoding="utf-8")
    out, cache = work / "total_out", work / "total_cache"
    for path in (out, cache):
        shutil.rmtree(path, ignore_errors=True)
    args = ["build", "--splits", str(head), "--out", str(out), "--cache", str(cache), "--processes", "1"]
    args += [a for a in build_args if "=" not in a] + [a for a in build_args if "=" in a]
    args.append(f"download.threads={THREADS}")
    before = _cpu_children()
    argv = [sys.executable, "-m", "flora.sharding", *args]
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True, preexec_fn=_pinned(core))
    spent = _cpu_children() - before
    accounting = json.loads((out / "manifest.json").read_text())["accounting"]
    for path in (out, cache, head):
        shutil.rmtree(path, ignore_errors=True)
    return spent, accounting["sharded"] + accounting["content_duplicates"]


def img2dataset_breakdown(python: Path, urls: Path, n: int, core: int, work: Path, settings: dict) -> dict:
    """img2dataset's stages and total per image (ms of one core), run with its own ``python``."""
    out = work / "i2d_stages.json"
    args = [str(urls), str(n), str(work / "i2d_stage_out"), str(out), json.dumps(settings)]
    subprocess.run([str(python), str(I2D_SCRIPT), "stages", *args], check=True, preexec_fn=_pinned(core))
    stages = json.loads(out.read_text())
    (cpu_n, ok_n), (cpu_s, ok_s) = (
        _i2d_run(python, urls, k, core, work, settings) for k in (n, n // MARGINAL)
    )
    stages["total"] = (cpu_n - cpu_s) / max(ok_n - ok_s, 1) * 1000
    return stages


def _i2d_run(python: Path, urls: Path, n: int, core: int, work: Path, settings: dict) -> tuple[float, int]:
    head = work / "i2d_urls.txt"
    head.write_text("".join(urls.read_text().splitlines(keepends=True)[:n]))
    out = work / "i2d_total"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(python), str(I2D_SCRIPT), "total", str(head), str(out), json.dumps(settings), str(THREADS)]
    before = _cpu_children()
    subprocess.run(argv, check=True, preexec_fn=_pinned(core))
    spent = _cpu_children() - before
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    shutil.rmtree(out, ignore_errors=True)
    return spent, ok


def floor_ms(urls: Path, base_root: Path, n: int, core: int) -> float:
    """ms of one core per image to decode each file behind the first ``n`` URLs at its stored size."""
    code = "import sys; from benchmarks.sharder_stages import _floor_child; _floor_child(*sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(urls), str(base_root), str(n)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=_pinned(core),
    )
    return float(proc.stdout.strip())


def _floor_child(urls: str, root: str, n: str) -> None:
    from urllib.parse import urlsplit

    from PIL import Image

    paths = [urlsplit(u).path.lstrip("/") for u in Path(urls).read_text().split()[: int(n)]]
    blobs = {p: (Path(root) / p).read_bytes() for p in set(paths)}
    spent = 0
    for p in paths:
        t0 = time.thread_time_ns()
        with Image.open(io.BytesIO(blobs[p])) as img:
            img.load()
        spent += time.thread_time_ns() - t0
    print(spent / len(paths) / 1e6)


def breakdown(
    flora_stage: dict, flora_total_ms: float, i2d: dict | None, floor: float, label: str
) -> list[dict]:
    """Rows of the breakdown table for one image set: Flora and img2dataset, ms of one core per image."""
    rows = []
    for tool, stages, total in (("Flora", flora_stage, flora_total_ms), ("img2dataset", i2d, None)):
        if stages is None:
            continue
        total = stages["total"] if total is None else total
        row = {"set": label, "tool": tool, **{s: stages.get(s, 0.0) for s in STAGES[:-1]}}
        row["python overhead & rest"] = total - sum(row[s] for s in STAGES[:-1])
        row["total"] = total
        row["floor (decode only)"] = floor
        rows.append(row)
    return rows


def plot(rows: list[dict], runs: list[dict], path: Path) -> None:
    """Stacked bars of the breakdown (ms of one core per image) and the images/s of every run."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r['tool']}\n{r['set']}" for r in rows]
    colours = plt.get_cmap("tab10").colors
    starts = [0.0] * len(rows)
    for i, stage in enumerate(STAGES):
        values = [max(0.0, r[stage]) for r in rows]
        left.barh(labels, values, left=starts, color=colours[i % 10], label=stage)
        starts = [s + v for s, v in zip(starts, values, strict=True)]
    for y, r in enumerate(rows):
        left.plot([r["floor (decode only)"]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
    left.set_xlabel("ms of one core per image (lower is better); black: decode-only floor")
    left.invert_yaxis()
    left.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    left.set_title("Per-image CPU, one core")
    names = list(dict.fromkeys(f"{r['set']}: {r['tool']}" for r in runs))
    for k, name in enumerate(names):
        mine = [r for r in runs if f"{r['set']}: {r['tool']}" == name]
        right.scatter([r["img_per_s"] for r in mine], [k] * len(mine), color=colours[k % 10], zorder=3)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("images / s, 2 processes x 32 threads (each dot one run)")
    right.set_title("Throughput, interleaved runs")
    right.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def scale_table(datas: dict[str, list[bytes]], shorter: int) -> list[dict]:
    """Decode ms per DCT scale (simplejpeg, one thread) and the resized result's PSNR and max abs
    difference against today's path (Pillow: full size, or ``draft`` from 2x), per image size."""
    try:
        import numpy as np
        import simplejpeg
    except ImportError:
        return []
    from PIL import Image

    from flora.sharding.images.convert import ImageConfig, process_image

    cfg = ImageConfig(resize_shorter_side=shorter, resample="box", jpeg_quality=90)
    rows = []
    for label, blobs in datas.items():
        refs = [np.asarray(Image.open(io.BytesIO(process_image(b, cfg).jpeg)).convert("RGB")) for b in blobs]
        for m in (8, 7, 6, 5, 4, 3, 2):
            spent, psnrs, worst, ok = 0, [], 0, True
            for blob, ref in zip(blobs, refs, strict=True):
                h, w, _, _ = simplejpeg.decode_jpeg_header(blob)
                need = (math.ceil(w * m / 8), math.ceil(h * m / 8))
                if min(need) < shorter:
                    ok = False
                    break
                t0 = time.thread_time_ns()
                pixels = simplejpeg.decode_jpeg(blob, "RGB", min_width=need[0], min_height=need[1])
                spent += time.thread_time_ns() - t0
                small = Image.fromarray(pixels).resize(
                    ref.shape[1::-1], Image.Resampling.BOX, reducing_gap=3.0
                )
                out = io.BytesIO()
                small.save(out, "JPEG", quality=90)
                got = np.asarray(Image.open(out).convert("RGB")).astype(np.int32)
                mse = float(((got - ref) ** 2).mean())
                psnrs.append(99.0 if mse == 0 else 10 * math.log10(255**2 / mse))
                worst = max(worst, int(np.abs(got - ref).max()))
            if ok:
                rows.append(
                    {
                        "set": label,
                        "scale": f"{m}/8",
                        "decode_ms": spent / len(blobs) / 1e6,
                        "psnr_db_min": min(psnrs),
                        "max_abs_diff": worst,
                    }
                )
    return rows
