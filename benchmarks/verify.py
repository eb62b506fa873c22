"""The cost of ``verify: full`` re-checks (``verify_every``) as a fraction of an epoch, on photo shards.

    python -m benchmarks.verify                  # the loader benchmark's photo set (built once)
    python -m benchmarks.verify --shards DIR     # shards you already have

A re-check (loaders/recheck.py) re-reads this rank's samples of an epoch and compares each jpg's
sha256 with the one its json records, before the epoch starts. Measured in one run, on the train
split, each loader alone on the machine, with the same threads:

1. per loader (DALI-CPU with full augmentations and with crop + flip, the shortest epoch and so
   the largest fraction; ``--torch`` adds the reference loader): the mean epoch time with
   ``verify_every: 0`` (the baseline) and with ``verify_every: 1``, epochs alternating between the
   two loaders after a warm-up epoch each, and the re-check's own seconds as the loader records
   them (``loader.rechecks``) as a fraction of the baseline epoch. That fraction is the figure; the
   difference of the two epoch times is shown too, but on a shared machine it is mostly noise.
2. the re-check alone with the shards in the page cache and with them evicted first
   (``posix_fadvise(DONTNEED)`` on the tars only: nothing else on the machine is touched), in MB/s.

Prints a table, writes ``benchmarks/results/verify.json`` and ``verify.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.loader import OUT, cores
from benchmarks.photos import build_photo_shards
from benchmarks.results import command_line, group_panels, print_table, publish, save_figure
from flora.loaders import create_dataloaders
from flora.loaders.recheck import recheck

#: The loaders measured: (label, backend, augment overrides); ``--torch`` adds TORCH.
LOADERS = [
    ("DALI-CPU (full)", "dali", {}),
    ("DALI-CPU (crop+flip)", "dali", {"rotate_degrees": 0.0, "brightness": 0.0, "contrast": 0.0,
                                      "saturation": 0.0, "hue": 0.0}),
]  # fmt: skip
TORCH = ("reference torch (full)", "torch", {})
MB = 1e6


def data_cfg(shards: Path, args, backend: str, augment: dict, verify_every: int) -> dict:
    return {
        "data": {
            "shards": str(shards),
            "image_size": args.size,
            "batch_size": args.batch,
            "threads": args.threads,
            "device": "cpu",
            "shuffle_buffer": args.buffer,
            "backend": backend,
            "verify": "full",
            "verify_every": verify_every,
            "augment": dict(augment),
        }
    }


def run_epoch(loader, epoch: int) -> float:
    """Seconds for one whole epoch (the re-check before it included)."""
    loader.set_epoch(epoch)
    started = time.perf_counter()
    for _batch in loader:
        pass
    return time.perf_counter() - started


def evict(paths: list[Path]) -> None:
    """Drops these files' pages from the page cache (and nothing else)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_loader(label: str, backend: str, augment: dict, shards: Path, args) -> dict:
    base, _, _ = create_dataloaders(data_cfg(shards, args, backend, augment, 0))
    checked, _, _ = create_dataloaders(data_cfg(shards, args, backend, augment, 1))
    run_epoch(base, 0)  # warm-up: page cache, DALI's and the workers' start-up
    run_epoch(checked, 0)  # (its re-check may skip shards its own scan has just hashed)
    plain, full = [], []
    for epoch in range(1, args.epochs + 1):
        plain.append(run_epoch(base, epoch))
        full.append(run_epoch(checked, epoch))
    recheck_s = [r["seconds"] for r in checked.rechecks if r["epoch"] >= 1]
    epoch_s, with_s = float(np.mean(plain)), float(np.mean(full))
    samples = len(checked.plan(1))
    row = {
        "loader": label,
        "epoch s": epoch_s,
        "epoch+check s": with_s,
        "check s": float(np.mean(recheck_s)),
        "check/epoch": float(np.mean(recheck_s)) / epoch_s,
        "slowdown": with_s / epoch_s - 1,
        "img/s": samples / epoch_s,
    }
    print(
        f"  {label}: epoch {epoch_s:.2f} s, with re-check {with_s:.2f} s, re-check {row['check s']:.2f} s "
        f"= {row['check/epoch']:.1%} of an epoch",
        flush=True,
    )
    base.close()
    checked.close()
    return {
        **row,
        "epochs": {"plain": plain, "verify_every_1": full, "recheck": recheck_s},
        "samples": samples,
    }


def measure_alone(shards: Path, args) -> dict:
    """The re-check by itself over the train split: page cache warm, and the tars evicted first."""
    train, _, _ = create_dataloaders(data_cfg(shards, args, "torch", {}, 0))
    index = train.index
    samples = np.arange(len(index))
    nbytes = int(index.jpg_size.sum())
    tars = [s.path for s in index.shards]
    out = {"samples": len(samples), "jpg_bytes": nbytes}
    for state in ("warm", "cold"):
        times = []
        for _ in range(args.repeats):
            if state == "cold":
                evict(tars)
            else:
                recheck(index, samples, "full", args.threads)  # pages in
            started = time.perf_counter()
            bad = recheck(index, samples, "full", args.threads)
            times.append(time.perf_counter() - started)
        if bad:
            raise SystemExit(f"benchmark: {len(bad)} samples of {shards} fail the re-check: {bad}")
        seconds = float(np.median(times))
        out[state] = {"seconds": seconds, "MB/s": nbytes / MB / seconds, "img/s": len(samples) / seconds}
        print(f"  re-check alone, {state}: {seconds:.2f} s, {nbytes / MB / seconds:,.0f} MB/s", flush=True)
    return out


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Epoch seconds per loader: the plain epoch, and the re-check's share on top."""
    fig, panels = group_panels([{**r, "panel": title} for r in rows], "panel", 7.5, 3.6)
    for ax, name, mine in panels:
        labels = [r["loader"] for r in mine]
        ax.barh(labels, [r["epoch s"] for r in mine], color="#4a7f3b", label="epoch (verify_every: 0)")
        ax.barh(labels, [r["check s"] for r in mine], left=[r["epoch s"] for r in mine], color="#c0504d",
                label="re-check (verify: full)")  # fmt: skip
        for y, r in enumerate(mine):
            ax.text(r["epoch s"] + r["check s"], y, f" +{r['check/epoch']:.1%}", va="center", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("seconds per epoch (lower is better)")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="a shard root (default: the loader benchmark's photos)")
    parser.add_argument("--photos", type=int, default=3000, help="photographs in the photo set")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--buffer", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per loader and setting")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the re-check alone (median)")
    parser.add_argument("--torch", action="store_true", help="also the reference loader (slow on few cores)")
    parser.add_argument("--name", default="verify", help="result name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.shards is not None:
        shards, set_name = args.shards, str(args.shards)
    else:
        shards, _ = build_photo_shards(OUT, args.photos)
        set_name = f"photos ({args.photos}, 500x375)"
    print(f"== {set_name}: {shards}", flush=True)
    loaders = LOADERS + ([TORCH] if args.torch else [])
    rows = [measure_loader(label, backend, aug, shards, args) for label, backend, aug in loaders]
    alone = measure_alone(shards, args)
    print()
    print_table(rows, ["loader", "img/s", "epoch s", "epoch+check s", "check s", "check/epoch", "slowdown"])
    print(f"\nre-check alone: warm {alone['warm']['MB/s']:,.0f} MB/s, cold {alone['cold']['MB/s']:,.0f} MB/s "
          f"({alone['jpg_bytes'] / MB:,.0f} MB of jpgs, {args.threads} threads)")  # fmt: skip
    title = f"verify: full re-check per epoch, train split of {set_name}, {args.threads} threads"
    publish(
        args.name,
        {
            "command": command_line("benchmarks.verify", argv),
            "machine": {"cores": cores(), "python": platform.python_version(), "torch": torch.__version__},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "set": set_name,
            "shards": str(shards),
            "loaders": rows,
            "recheck_alone": alone,
            "chart": f"{args.name}.png",
        },
        lambda png: chart(rows, png, title),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
