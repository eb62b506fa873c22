"""Loader images/s, side by side in one run: DALI, the torch reference loader, the decode ceiling,
and the seed's per-sample HTTP Dataset.

    python -m benchmarks.loader                      # builds both sets under benchmarks/out/loader
    python -m benchmarks.loader --shards DIR [...]   # also measures shards you already have

For each shard set (the sample world as ``make demo`` makes it; ~500x375 photographs, see
photos.py; any ``--shards``), with the same threads for everyone and training augmentations:

1. DALI-CPU vs the reference torch loader (webdataset-style pipeline, PIL, torchvision v2), for
   the seed's augmentation list (crop, flip, rotation, color jitter) and for crop + flip only.
2. DALI-CPU vs the decode ceiling: one core's PIL (libjpeg-turbo) decode rate on the same JPEGs,
   times the cores.
3. The seed's approach (per-sample HTTP GET from a loopback server with an in-process LRU cache,
   as a torch ``Dataset`` in a ``DataLoader``; sets whose originals are served) vs the shard
   loaders, warm: its second epoch.
4. With a GPU: DALI with the ``mixed`` decoder and GPU operators, and the GPU's name.
5. The cost of sampling: ``data.sampling: {policy: class_balanced}`` against ``policy: uniform``
   (the shard-ordered plan), for DALI-CPU and the reference loader, with crop + flip (the list where
   reading weighs most): one loader per policy, both warmed up, then the same ``--sampling-epochs``
   epochs read by both in turn, which goes first alternating (ABBA), so a drift of a shared machine
   weighs on both alike. The ratio class_balanced / uniform per loader is the figure (target: at
   least 0.95). ``shard_runs_per_epoch``: the index files DALI is given per epoch under each policy
   (a sampled list is read in windows of ``--buffer``, one file per shard a window touches).

Every rate is images per second over whole epochs after one warm-up epoch. Prints a table,
writes ``benchmarks/results/loader.json`` and a bar chart ``loader.png``.

    python -m benchmarks.loader --only sampling    # part 5 alone, a few minutes

``--only sampling`` measures part 5 and merges it into the existing results (the other figures and
their rows are kept as they were measured, with their command).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.photos import build_photo_shards, build_world_shards
from benchmarks.results import RESULTS_DIR, command_line, print_table, publish, rate_bars
from flora.loaders import create_dataloaders
from flora.loaders.reference import build_transform

OUT = Path(__file__).resolve().parent / "out" / "loader"
#: The seed's list vs timm's default train transform (RandomResizedCrop + flip).
AUGMENTS = {
    "full": {},
    "crop+flip": {"rotate_degrees": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
}
DECODE_SAMPLE = 600  # JPEGs decoded (twice) for the one-core ceiling
#: Part 5: the policies compared (the first is the baseline) and the augmentation list they run with.
SAMPLING_POLICIES = ("uniform", "class_balanced")
SAMPLING_AUGMENT = "crop+flip"
#: How close class_balanced must come to uniform (issue 26's cost item: within 5%).
SAMPLING_TARGET = 0.95
BACKEND_LABELS = {"dali": "DALI-CPU", "torch": "reference torch"}
RATIO_KEYS = {"dali": "class_balanced_vs_uniform_dali", "torch": "class_balanced_vs_uniform_reference"}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def data_cfg(shards: Path, args, **over) -> dict:
    aug = over.pop("augment", {})
    data = {
        "shards": str(shards),
        "image_size": args.size,
        "batch_size": args.batch,
        "threads": args.threads,
        "device": "cpu",
        "shuffle_buffer": args.buffer,
        "augment": aug,
        **over,
    }
    return {"data": data}


def time_loader(loader, min_images: int) -> tuple[float, int]:
    """Images/s over whole epochs (after one warm-up epoch) until at least ``min_images``."""
    loader.set_epoch(0)
    for _ in loader:
        pass
    images, started, epoch = 0, time.perf_counter(), 1
    while images < min_images:
        loader.set_epoch(epoch)
        for batch in loader:
            images += int(batch["valid"].sum())
        epoch += 1
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - started), images


def decode_ceiling(index) -> tuple[float, float]:
    """(one core's PIL decode rate, x cores) on the first JPEGs of the split."""
    blobs = []
    for sid in range(min(DECODE_SAMPLE, len(index))):
        with open(index.shards[index.shard_of(sid)].path, "rb") as f:
            f.seek(int(index.jpg_offset[sid]))
            blobs.append(f.read(int(index.jpg_size[sid])))
    started = time.perf_counter()
    for _ in range(2):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as img:
                img.convert("RGB").load()
    one = 2 * len(blobs) / (time.perf_counter() - started)
    return one, one * cores()


class SeedHTTPDataset(torch.utils.data.Dataset):
    """The seed's loader: per-sample ``requests.get`` with an in-process LRU cache, PIL, transforms."""

    def __init__(self, urls: list[str], labels: list[int], transform, cache_items: int):
        self.urls, self.labels, self.transform = urls, labels, transform
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.cache_items = cache_items

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        import requests

        url = self.urls[i]
        data = self.cache.get(url)
        if data is None:
            data = requests.get(url, timeout=30).content
            self.cache[url] = data
            if len(self.cache) > self.cache_items:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(url)
        with Image.open(io.BytesIO(data)) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def time_seed(index, images_dir: Path, args, min_images: int) -> dict:
    """The seed's Dataset over the originals the shards were built from, served on loopback."""
    import json

    from flora.loaders.config import load_data_config
    from world import ImageServer

    meta: dict[str, dict] = {}
    for shard in index.shards:
        with tarfile.open(shard.path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())
    with ImageServer(images_dir) as server:
        urls = [f"{server.base_url}/{meta[key]['image_url'].split('/', 3)[3]}" for key in index.keys]
        labels = index.labels.tolist()
        cfg = load_data_config(data_cfg(index.root, args))
        dataset = SeedHTTPDataset(urls, labels, build_transform(cfg, True), cache_items=len(urls))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch, shuffle=True, num_workers=args.threads, drop_last=True
        )
        rates = []
        for _epoch in range(2):  # the second epoch is "warm": server, page cache and (in theory) LRU
            started, n = time.perf_counter(), 0
            for images, _labels in loader:
                n += len(images)
            rates.append(n / (time.perf_counter() - started))
        requests_served = server.request_count()
    return {"cold": rates[0], "warm": rates[1], "http_requests": requests_served, "epoch_images": n}


def measure_set(name: str, shards: Path, images_dir: Path | None, args) -> tuple[list[dict], dict]:
    rows, out = [], {"shards": str(shards)}
    min_images = args.min_images
    for aug_name, aug in AUGMENTS.items():
        for backend in ("torch", "dali"):
            train, _, info = create_dataloaders(data_cfg(shards, args, backend=backend, augment=dict(aug)))
            rate, n = time_loader(train, min_images)
            out[f"{backend}_{aug_name}"] = rate
            label = "DALI-CPU" if backend == "dali" else "reference torch"
            rows.append({"set": name, "loader": f"{label} ({aug_name})", "images": n, "img/s": rate})
            print(f"  {name}: {label} ({aug_name}) {rate:,.0f} img/s", flush=True)
    out["train_samples"] = info.samples[train.index.split]
    one, ceiling = decode_ceiling(train.index)
    out.update(decode_one_core=one, decode_ceiling=ceiling, cores=cores())
    rows.append({"set": name, "loader": f"decode ceiling (PIL 1 core x {cores()})", "img/s": ceiling})
    if images_dir is not None:
        seed = time_seed(train.index, images_dir, args, min_images)
        out["seed"] = seed
        rows.append({"set": name, "loader": "seed HTTP+LRU Dataset, warm (full)", "img/s": seed["warm"]})
        print(f"  {name}: seed warm {seed['warm']:,.0f} img/s", flush=True)
    if torch.cuda.is_available():
        for aug_name, aug in AUGMENTS.items():
            cfg = data_cfg(shards, args, backend="dali", augment=dict(aug), device="gpu")
            train, _, info = create_dataloaders(cfg)
            rate, n = time_loader(train, max(min_images, 4 * len(train.index) // 3))
            out[f"dali_gpu_{aug_name}"] = rate
            rows.append({"set": name, "loader": f"DALI-GPU mixed ({aug_name})", "images": n, "img/s": rate})
        out["gpu"] = torch.cuda.get_device_name(0)
    out["ratios"] = {
        "dali_vs_reference_full": out["dali_full"] / out["torch_full"],
        "dali_vs_reference_crop_flip": out["dali_crop+flip"] / out["torch_crop+flip"],
        "dali_vs_decode_ceiling_full": out["dali_full"] / ceiling,
        "dali_vs_decode_ceiling_crop_flip": out["dali_crop+flip"] / ceiling,
    }
    if "seed" in out:
        out["ratios"]["dali_vs_seed_warm_full"] = out["dali_full"] / out["seed"]["warm"]
        out["ratios"]["reference_vs_seed_warm_full"] = out["torch_full"] / out["seed"]["warm"]
    return rows, out


def time_epoch(loader, epoch: int) -> tuple[int, float]:
    """(images, seconds) of one whole epoch."""
    loader.set_epoch(epoch)
    images, started = 0, time.perf_counter()
    for batch in loader:
        images += int(batch["valid"].sum())
    return images, time.perf_counter() - started


def alternate(loaders: dict, epochs: int) -> tuple[dict, dict, dict]:
    """Epochs 1..``epochs`` read by every loader of ``loaders`` in turn, which goes first alternating
    (ABBA: a drift of the machine weighs on all alike): images, seconds and per-epoch images/s by key."""
    keys = list(loaders)
    images, seconds = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0.0)
    per_epoch: dict[str, list[float]] = {key: [] for key in keys}
    for epoch in range(1, epochs + 1):
        for key in keys if epoch % 2 else keys[::-1]:
            n, t = time_epoch(loaders[key], epoch)
            images[key] += n
            seconds[key] += t
            per_epoch[key].append(n / t)
    return images, seconds, per_epoch


def shard_runs(loader, epoch: int) -> int:
    """Runs of one shard in the rank's reading order of ``epoch``: the index files DALI is given (one
    per shard for the shard-ordered plan, one per shard and window of ``shuffle_buffer`` when sampled)."""
    ids = loader.planner.rank_plan(epoch, loader.rank, loader.world_size).ids
    return int(np.count_nonzero(np.diff(loader.index.shards_of(ids), prepend=-1)))


def measure_sampling(name: str, shards: Path, args) -> tuple[list[dict], dict]:
    """Part 5: per loader, one loader per policy in SAMPLING_POLICIES, each warmed up with epoch 0,
    then epochs 1..``args.sampling_epochs`` read by both, alternating which goes first (ABBA: a drift
    of the machine weighs on both alike); images/s over those epochs and class_balanced / uniform."""
    out: dict = {"augment": SAMPLING_AUGMENT, "epochs": args.sampling_epochs}
    rows, ratios = [], {}
    for backend in ("torch", "dali"):
        loaders = {}
        for policy in SAMPLING_POLICIES:
            cfg = data_cfg(shards, args, backend=backend, augment=dict(AUGMENTS[SAMPLING_AUGMENT]),
                           sampling={"policy": policy})  # fmt: skip
            loaders[policy] = create_dataloaders(cfg)[0]
            time_epoch(loaders[policy], 0)  # warm-up
        out["shard_runs_per_epoch"] = {policy: shard_runs(loader, 1) for policy, loader in loaders.items()}
        images, seconds, per_epoch = alternate(loaders, args.sampling_epochs)
        rate = {policy: images[policy] / seconds[policy] for policy in SAMPLING_POLICIES}
        ratio = rate["class_balanced"] / rate["uniform"]
        key = "reference" if backend == "torch" else backend
        paired = [c / u for u, c in zip(per_epoch["uniform"], per_epoch["class_balanced"], strict=True)]
        out[key] = {**rate, "per_epoch": per_epoch, "class_balanced_vs_uniform": ratio,
                    "per_epoch_ratio_median": float(np.median(paired))}  # fmt: skip
        ratios[RATIO_KEYS[backend]] = ratio
        print(f"  {name}: {BACKEND_LABELS[backend]} ({SAMPLING_AUGMENT}) uniform {rate['uniform']:,.0f}, "
              f"class_balanced {rate['class_balanced']:,.0f} img/s ({ratio:.3f}x)", flush=True)  # fmt: skip
        for policy in SAMPLING_POLICIES:
            label = f"{BACKEND_LABELS[backend]} ({SAMPLING_AUGMENT}), sampling: {policy}"
            row = {"set": name, "loader": label, "images": images[policy], "img/s": rate[policy]}
            if policy != SAMPLING_POLICIES[0]:
                row["vs uniform"] = ratio
            rows.append(row)
    out["met"] = all(r >= SAMPLING_TARGET for r in ratios.values())
    return rows, {"sampling": out, "ratios": ratios}


def is_sampling_row(row: dict) -> bool:
    return ", sampling: " in row["loader"]


def merge_sampling(previous: dict, results: dict, rows: list[dict]) -> dict:
    """``previous`` (the last run's result) with part 5 replaced by this run's: each set's ``sampling``
    and its ratios, and the sampling rows (after their set's other rows); the rest as it was measured."""
    merged = {k: v for k, v in previous.items() if k != "measured_at"}
    merged["other_parts_measured_at"] = previous.get("other_parts_measured_at", previous.get("measured_at"))
    sets = merged.setdefault("sets", {})
    for name, res in results.items():
        entry = sets.setdefault(name, {"shards": res["shards"]})
        entry["sampling"] = res["sampling"]
        entry.setdefault("ratios", {}).update(res["ratios"])
    old = [r for r in previous.get("rows", []) if not (r["set"] in results and is_sampling_row(r))]
    order = list(sets)
    merged["rows"] = sorted(
        old + rows, key=lambda r: order.index(r["set"]) if r["set"] in order else len(order)
    )
    return merged


def sampling_title(results: dict) -> str:
    """The chart's title: class_balanced / uniform per set and loader."""
    parts = []
    for name, res in results.items():
        ratios = res.get("ratios", {})
        if RATIO_KEYS["dali"] in ratios:
            parts.append(f"{name}: DALI-CPU {ratios[RATIO_KEYS['dali']]:.2f}, "
                         f"reference {ratios[RATIO_KEYS['torch']]:.2f}")  # fmt: skip
    return f"class_balanced / uniform images/s ({SAMPLING_AUGMENT}): " + "; ".join(parts) if parts else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, nargs="*", default=[], help="extra shard roots to measure")
    parser.add_argument("--photos", type=int, default=3000, help="photographs in the photo set (0: skip)")
    parser.add_argument("--world-records", type=int, default=3000, help="sample-world records (0: skip)")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--buffer", type=int, default=512)
    parser.add_argument("--min-images", type=int, default=2000, help="images timed per loader")
    parser.add_argument("--name", default="loader", help="result name under benchmarks/results/")
    parser.add_argument("--sampling-epochs", type=int, default=6, help="part 5: epochs timed per policy")
    parser.add_argument(
        "--only", choices=["sampling"], help="measure part 5 alone and merge it into the existing results"
    )
    args = parser.parse_args(argv)
    sets: list[tuple[str, Path, Path | None]] = []
    if args.world_records:
        shards, images = build_world_shards(OUT, args.world_records)
        sets.append((f"sample world ({args.world_records} records, 256 px)", shards, images))
    if args.photos:
        shards, images = build_photo_shards(OUT, args.photos)
        sets.append((f"photos ({args.photos}, 500x375)", shards, images))
    sets += [(str(p), p, None) for p in args.shards]
    rows, results = [], {}
    for name, shards, images in sets:
        print(f"== {name}: {shards}", flush=True)
        set_rows, results[name] = ([], {"shards": str(shards), "ratios": {}}) if args.only else (
            measure_set(name, shards, images, args))  # fmt: skip
        sampling_rows, sampling = measure_sampling(name, shards, args)
        results[name]["sampling"] = sampling["sampling"]
        results[name]["ratios"].update(sampling["ratios"])
        rows += set_rows + sampling_rows
    command = command_line("benchmarks.loader", argv)
    result = {
        "command": command,
        "machine": {
            "cores": cores(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("shards", "only")},
        "sets": results,
        "rows": rows,
        "chart": f"{args.name}.png",
    }
    previous = RESULTS_DIR / f"{args.name}.json"
    if args.only and previous.is_file():
        result = merge_sampling(json.loads(previous.read_text(encoding="utf-8")), results, rows)
    result["sampling"] = {"command": command, "target": SAMPLING_TARGET,
                          "epochs": args.sampling_epochs, "augment": SAMPLING_AUGMENT}  # fmt: skip
    print()
    print_table(result["rows"], ["set", "loader", "images", "img/s", "vs uniform"])
    print()
    for name, res in result["sets"].items():
        print(name, {k: round(v, 2) for k, v in res["ratios"].items()})
    title = sampling_title(result["sets"])
    publish(
        args.name, result, lambda png: rate_bars(result["rows"], "set", "loader", "img/s", png, title=title)
    )
    met = all(res.get("sampling", {}).get("met", True) for res in result["sets"].values())
    print(f"class_balanced within {1 - SAMPLING_TARGET:.0%} of uniform: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
