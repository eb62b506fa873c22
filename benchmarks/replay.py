"""What replaying stored views costs the loaders: images/s with stored views against fresh random
augmentation, per backend, in one run.

    python -m benchmarks.replay                      # 3,000 photos (~500x375), 6 timed epochs: a few minutes

Cached distillation with stored views (``distill.cache.views``) makes the training loader replay each
image's stored crop, flip, rotation and colour (loaders/views.py) instead of drawing fresh ones: on
DALI a ``python_function`` hands each sample's box and values to ``decoders.image_slice`` and the
usual operators; on the reference loader torchvision's functional ops run per sample. This measures
what that costs against the same loader with the same augmentation list drawn at random.

For DALI-CPU and the reference loader: one loader per mode (``fresh``: the seed's augmentation list;
``replay``: ``--views`` stored views drawn from the same ranges), each warmed up with epoch 0, then
``--epochs`` epochs read by both, which goes first alternating (ABBA), so a drift of the shared machine
weighs on both alike. The figure is replay / fresh images/s per backend.

Prints a table, writes ``benchmarks/results/replay.json`` and ``replay.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.loader import alternate, time_epoch
from benchmarks.photos import build_photo_shards
from benchmarks.results import command_line, print_table, publish, rate_bars
from flora.loaders import create_dataloaders
from flora.loaders.dali import HAVE_DALI
from flora.loaders.views import Replay, draw

OUT = Path(__file__).resolve().parent / "out" / "loader"  # the photo set the loader benchmark builds
MODES = ("fresh", "replay")
BACKEND_LABELS = {"dali": "DALI-CPU", "torch": "reference torch"}


def data_cfg(shards: Path, args, backend: str) -> dict:
    return {
        "data": {
            "shards": str(shards),
            "backend": backend,
            "device": "cpu",
            "image_size": args.size,
            "batch_size": args.batch,
            "threads": args.threads,
            "shuffle_buffer": args.buffer,
            "index_cache": "off",
            "worker_start": "fork",
        }
    }


def measure(shards: Path, args, backend: str) -> dict:
    loaders = {}
    for mode in MODES:
        loader = create_dataloaders(data_cfg(shards, args, backend))[0]
        if mode == "replay":
            keys = loader.index.keys
            loader.set_replay(Replay.for_keys(draw(keys, args.views, loader.cfg.augment, 0), keys, 0))
        time_epoch(loader, 0)  # warm-up
        loaders[mode] = loader
    images, seconds, per_epoch = alternate(loaders, args.epochs)
    rate = {mode: images[mode] / seconds[mode] for mode in MODES}
    paired = [r / f for f, r in zip(per_epoch["fresh"], per_epoch["replay"], strict=True)]
    return {
        "images": images,
        "img_per_s": rate,
        "per_epoch": per_epoch,
        "replay_vs_fresh": rate["replay"] / rate["fresh"],
        "per_epoch_ratio_median": float(np.median(paired)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=3000, help="photographs in the set")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--buffer", type=int, default=512)
    parser.add_argument("--views", type=int, default=8, help="stored views per image")
    parser.add_argument("--epochs", type=int, default=6, help="epochs timed per mode")
    args = parser.parse_args(argv)
    shards, _ = build_photo_shards(OUT, args.photos)
    name = f"photos ({args.photos}, 500x375)"
    backends = ["torch", "dali"] if HAVE_DALI else ["torch"]
    results, rows = {}, []
    for backend in backends:
        res = results[backend] = measure(shards, args, backend)
        rate = res["img_per_s"]
        print(f"  {BACKEND_LABELS[backend]}: fresh {rate['fresh']:,.0f}, replay {rate['replay']:,.0f} img/s "
              f"({res['replay_vs_fresh']:.3f}x)", flush=True)  # fmt: skip
        for mode in MODES:
            row = {"set": name, "loader": f"{BACKEND_LABELS[backend]}, {mode}", "images": res["images"][mode],
                   "img/s": res["img_per_s"][mode]}  # fmt: skip
            if mode == "replay":
                row["vs fresh"] = res["replay_vs_fresh"]
            rows.append(row)
    result = {
        "benchmark": "replay",
        "command": command_line("benchmarks.replay", argv),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "settings": vars(args),
        "set": name,
        "backends": results,
        "rows": rows,
    }
    print()
    print_table(rows, ["set", "loader", "images", "img/s", "vs fresh"])
    title = "stored views replayed vs fresh augmentation (seed's list), " + ", ".join(
        f"{BACKEND_LABELS[b]} {r['replay_vs_fresh']:.2f}x" for b, r in results.items()
    )
    publish("replay", result, lambda png: rate_bars(rows, "set", "loader", "img/s", png, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
