"""Near-duplicate detection, measured: hashing cost, recall and false matches by threshold, and the
candidate search at 900k hashes (``python -m benchmarks.neardup``).

1. Hashing: ``perceptual_hashes`` (the whole image and its 9 crops) and ``perceptual_hash`` (the
   whole image alone) per stored JPEG (ms), against ``process_image`` on the same bytes (the
   baseline: what the sharder already spends per image).
2. Recall on planted near-duplicates of each image: resized to 50-70% (bicubic, q90), re-encoded at
   JPEG q70, and 5% cropped (5% of the width and of the height cut, split randomly between the two
   sides, q90); and false matches among distinct images (all pairs), for thresholds 0..24. A pair
   matches as ``judge`` decides: whole-image hashes within the threshold, or one's whole-image hash
   and one of the other's crop hashes (``false_pairs_whole_only``: whole-image hashes alone). Two sets:
   the sample world's synthetic plants (``world.render_image``, distinct species and variants), and
   the photographs of Debian's opencv-doc (benchmarks/photos.py; contains true near-duplicate pairs
   of its own - stereo pairs, a forgery and its original, overlapping screenshots - so its "false"
   matches are an upper bound).
3. The search (``judge``: ``near_pairs`` over the whole-image hashes, ``cross_pairs`` of those against
   the crop hashes) on 900k samples: random 64-bit whole-image hashes, each with 9 crop hashes 6 bits
   from it (as real crops are: each query finds its own crops, which are skipped), plus 900 planted
   pairs (one sample's whole-image hash within the threshold of another's crop hash), at several
   thresholds: seconds and peak memory (a child process each, its ``VmHWM``), against the brute force
   rate extrapolated from 20k hashes.

Writes ``results/neardup.json`` and ``results/neardup.png``. Leaves out: the sharder's own speed
(sharder.py).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.results import command_line, print_table, publish, pyplot, save_figure
from flora.sharding.build.job import memory_mib
from flora.sharding.images.convert import ImageConfig, process_image
from flora.sharding.images.neardup import (
    DEFAULT_THRESHOLD,
    N_CROPS,
    brute_pairs,
    hash_value,
    judge,
    perceptual_hash,
    perceptual_hashes,
    plan_bands,
)

THRESHOLDS = list(range(0, 25, 2))
TARGET_RECALL, TARGET_FALSE = 0.99, 1e-4  # the bar: >= 99% recall at <= 0.01% false matches
WORK = Path(__file__).resolve().parent / "out" / "neardup"


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def variants(img: Image.Image, rng: random.Random) -> dict[str, bytes]:
    w, h = img.size
    f = rng.uniform(0.5, 0.7)
    dx, dy = round(w * 0.05), round(h * 0.05)
    ox, oy = rng.randint(0, dx), rng.randint(0, dy)
    return {
        "resize": jpeg(img.resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC)),
        "q70": jpeg(img, 70),
        "crop5": jpeg(img.crop((ox, oy, ox + w - dx, oy + h - dy))),
    }


def world_images(n_species: int, per_species: int) -> list[Image.Image]:
    from world.images import render_image
    from world.tables import SPECIES

    names = [s[0] for s in SPECIES][:n_species]
    return [
        Image.open(io.BytesIO(render_image(n, v, seed=0))).convert("RGB")
        for n in names
        for v in range(per_species)
    ]


def opencv_images() -> list[Image.Image]:
    from benchmarks.photos import fetch_sources

    out = []
    for path in fetch_sources(Path(__file__).resolve().parent / "out" / "loader"):
        img = Image.open(path).convert("RGB")
        scale = 500 / max(img.size)
        out.append(
            img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        )
    return out


def hashes_of(data: bytes) -> tuple[int, np.ndarray]:
    whole, crops = perceptual_hashes(data)
    return hash_value(whole), np.array([hash_value(c) for c in crops], dtype=np.uint64)


def distance(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]) -> int:
    """What ``judge`` compares: whole with whole, and each one's whole with the other's crops."""
    (wa, ca), (wb, cb) = a, b
    crossed = np.bitwise_count(np.concatenate([ca ^ np.uint64(wb), cb ^ np.uint64(wa)]))
    return min((wa ^ wb).bit_count(), int(crossed.min()))


def distinct_distances(whole: np.ndarray, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(judge's distance, whole-image distance) of every pair of distinct images, brute force."""
    best = np.bitwise_count(whole[:, None] ^ whole[None, :]).astype(np.int64)
    only_whole = best.copy()
    for c in range(crops.shape[1]):
        crossed = np.bitwise_count(whole[:, None] ^ crops[None, :, c])
        best = np.minimum(best, np.minimum(crossed, crossed.T))
    upper = np.triu_indices(whole.size, 1)
    return best[upper], only_whole[upper]


def quality(name: str, images: list[Image.Image], seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    base, dist = [], {"resize": [], "q70": [], "crop5": []}
    for img in images:
        h = hashes_of(jpeg(img))
        base.append(h)
        for kind, copy in variants(img, rng).items():
            dist[kind].append(distance(h, hashes_of(copy)))
    whole = np.array([w for w, _ in base], dtype=np.uint64)
    distinct, only_whole = distinct_distances(whole, np.stack([c for _, c in base]))
    pairs = distinct.size
    rows = []
    for k in THRESHOLDS:
        row = {"set": name, "threshold": k}
        for kind, ds in dist.items():
            row[f"recall_{kind}"] = float(np.mean(np.asarray(ds) <= k))
        row["false_pairs"] = int((distinct <= k).sum())
        row["false_rate_pct"] = 100 * row["false_pairs"] / pairs
        row["false_pairs_whole_only"] = int((only_whole <= k).sum())
        rows.append(row)
    return rows, {"set": name, "images": len(base), "distinct_pairs": pairs}


def hashing_cost(images: list[Image.Image]) -> dict:
    cfg = ImageConfig(resize_shorter_side=256)
    stored = [process_image(jpeg(img), cfg).jpeg for img in images]
    t = time.perf_counter()
    for data in stored:
        perceptual_hash(data)
    whole_ms = (time.perf_counter() - t) / len(stored) * 1e3
    t = time.perf_counter()
    for data in stored:
        perceptual_hashes(data)
    phash_ms = (time.perf_counter() - t) / len(stored) * 1e3
    raw = [jpeg(img) for img in images]
    t = time.perf_counter()
    for data in raw:
        process_image(data, cfg)  # includes perceptual_hashes: the share below is of this whole
    process_ms = (time.perf_counter() - t) / len(raw) * 1e3
    return {"images": len(stored), "phash_ms": phash_ms, "whole_phash_ms": whole_ms,
            "process_image_ms": process_ms, "phash_share_pct": 100 * phash_ms / process_ms}  # fmt: skip


def search_child(n: int, k: int) -> None:
    """One measurement in this (child) process: prints a JSON line."""
    rng = np.random.default_rng(k)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    own = np.zeros((n, N_CROPS), dtype=np.uint64)  # each crop <= 6 bits from its own whole-image hash
    for _bit in range(6):
        own |= np.uint64(1) << rng.integers(0, 64, size=own.shape, dtype=np.uint64)
    crops = h[:, None] ^ own
    planted = n // 1000
    flips = rng.integers(0, 2**64 - 1, size=planted, dtype=np.uint64, endpoint=True)
    near = np.zeros(planted, dtype=np.uint64)
    for i, f in enumerate(flips.tolist()):  # k bits of the random word, at most: a pair within k
        bits = [b for b in range(64) if f >> b & 1][:k]
        near[i] = sum(1 << b for b in bits)
    h[1 : 2 * planted : 2] = crops[0 : 2 * planted : 2, 4] ^ near  # a whole hash near another's crop
    crops[1 : 2 * planted : 2] = h[1 : 2 * planted : 2, None] ^ own[1 : 2 * planted : 2]
    splits = np.zeros(n, dtype=np.uint8)
    splits[1::2] = 1  # every planted copy in another split: each one dropped
    owner = np.repeat(np.arange(n), N_CROPS)
    crops = crops.ravel()
    del own
    before = memory_mib("VmRSS")
    t = time.perf_counter()
    dropped = judge(h, splits, k, "keep", crops, owner)
    seconds = time.perf_counter() - t
    recall = np.mean([dropped.get(i + 1, (None,))[0] == i for i in range(0, 2 * planted, 2)])
    peak = memory_mib("VmHWM")  # this process's own peak (ru_maxrss would carry the parent's over exec)
    print(json.dumps({"hashes": n, "crop_hashes": crops.size, "threshold": k, "seconds": seconds,
                      "dropped": len(dropped), "planted_found": recall, "peak_rss_mib": peak,
                      "search_mib": peak - before,
                      "bands": [[b.width, b.radius] for b in plan_bands(crops.size, k)]}))  # fmt: skip


def search(n: int, thresholds: list[int]) -> list[dict]:
    rows = []
    for k in thresholds:
        cmd = [sys.executable, "-m", "benchmarks.neardup", "--search-child", str(n), str(k)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    small = np.random.default_rng(0).integers(0, 2**63, size=20_000, dtype=np.uint64)
    t = time.perf_counter()
    brute_pairs(small, DEFAULT_THRESHOLD)
    per_pair = (time.perf_counter() - t) / (small.size**2 / 2)
    for row in rows:  # whole x whole, and each whole x every crop
        row["brute_force_s_estimate"] = per_pair * (n * n / 2 + n * n * N_CROPS)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, sorted({r["set"] for r in rows}), strict=False):
        mine = [r for r in rows if r["set"] == name]
        ks = [r["threshold"] for r in mine]
        for kind in ("resize", "q70", "crop5"):
            ax.plot(ks, [100 * r[f"recall_{kind}"] for r in mine], marker="o", label=f"recall {kind}")
        ax2 = ax.twinx()
        ax2.semilogy(ks, [max(r["false_rate_pct"], 1e-5) for r in mine], "k--", label="false matches %")
        ax2.axhline(100 * TARGET_FALSE, color="red", lw=0.8)
        ax.axvline(DEFAULT_THRESHOLD, color="grey", lw=0.8)
        ax.set(title=name, xlabel="threshold (bits)", ylabel="recall %")
        ax2.set_ylabel("false matches, % of distinct pairs")
        ax.legend(loc="center right", fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hashes", type=int, default=900_000)
    parser.add_argument("--search-thresholds", type=int, nargs="*", default=[6, DEFAULT_THRESHOLD, 10])
    parser.add_argument("--world-species", type=int, default=62)
    parser.add_argument("--per-species", type=int, default=20)
    args = parser.parse_args()
    if args.search_child:
        search_child(*args.search_child)
        return
    world = world_images(args.world_species, args.per_species)
    photos = opencv_images()
    cost = hashing_cost(photos)
    print(
        f"pHash + 9 crops {cost['phash_ms']:.2f} ms/image (whole only {cost['whole_phash_ms']:.2f}), "
        f"process_image {cost['process_image_ms']:.2f} ms"
    )
    rows, sets = [], []
    for name, images in (("world", world), ("opencv photos", photos)):
        r, s = quality(name, images)
        rows += r
        sets.append(s)
    cols = [
        "set",
        "threshold",
        "recall_resize",
        "recall_q70",
        "recall_crop5",
        "false_pairs",
        "false_rate_pct",
        "false_pairs_whole_only",
    ]
    print_table(rows, cols)
    found = search(args.hashes, args.search_thresholds)
    print_table(
        found,
        [
            "hashes",
            "threshold",
            "seconds",
            "peak_rss_mib",
            "dropped",
            "planted_found",
            "brute_force_s_estimate",
        ],
    )
    result = {"command": command_line("benchmarks.neardup"), "default_threshold": DEFAULT_THRESHOLD,
              "hashing": cost, "sets": sets, "by_threshold": rows, "search": found,
              "targets": {"recall": TARGET_RECALL, "false_rate": TARGET_FALSE}}  # fmt: skip
    publish("neardup", result, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
