"""Batches that mix species: distinct species per batch, read through the real loaders, against i.i.d.
batches of the same epoch list.

    python -m benchmarks.mixing                       # 8,000 samples, 400 species, 20 shards of 400
    python -m benchmarks.mixing --backends torch --epochs 1

A loader's shuffle buffer only mixes what it holds: ``shuffle_buffer`` samples read in a row. When the
reading order is the shards' own order, a batch draws from one or two shards, so how the samples lie
in the tars decides how many species a batch holds. The sharder writes each split and region in a
seeded hash order (sharding/build/plan.py), so any run of a shard is a random sample of the split;
a user's own webdataset shards are often written species by species.

Data: one long-tailed label set (``benchmarks.sampling.zipf_labels``: 8,000 samples over 400
species, from 1,415 down to 3 samples per species), tiny 16x16 JPEGs, written twice in Flora's shard
format (``write_shard_set``: the format's own tar writer, index files, class mapping and manifest)
with the same samples: in the sharder's order (``flora``) and sorted by species (``by_species``). A
small validation split, the same in both, is there because the loaders need one.

For each shard order x policy (``uniform``; ``uniform`` with ``interleave: true``; ``class_balanced``)
x backend (DALI on CPU; the torch reference loader), ``--epochs`` real training epochs through
``create_dataloaders`` (batch 64, shuffle_buffer 512, one rank, ``train_remainder: drop``): each
batch's labels (valid rows), the number of distinct species in it, averaged over the batches. The
baseline is i.i.d. batches of the same epoch list (``train.planner.epoch_list(e)``): a batch of ``b``
drawn from a uniform random permutation of the list is a uniform ``b``-subset of it, so its expected
number of distinct species is exact (``iid_distinct``: a species with ``c`` of the list's ``L``
entries is missing from the batch with probability ``C(L - c, b) / C(L, b)``). Reported: both, their
ratio and the gap in percent.

Prints a table, writes ``benchmarks/results/mixing.json`` and ``mixing.png`` (ratio to i.i.d. per
case, one panel per shard order).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.results import REPO, command_line, print_table, publish, pyplot, save_figure
from benchmarks.sampling import zipf_labels
from flora.config import from_dict
from flora.loaders.index import buffer_shuffle, rank_bounds
from flora.loaders.plan import BUFFER_SALT, epoch_seed, reading_window, window_order
from flora.loaders.sampling import SamplingConfig, epoch_samples
from flora.sharding.catalog.records import url_key
from flora.sharding.catalog.split import seeded_rank
from flora.sharding.format.schema import (
    CLASS_MAPPING,
    MANIFEST,
    PERMISSIVE,
    SampleMeta,
    safe_key,
    shard_name,
    write_index,
)
from flora.sharding.format.writer import RollingTarWriter, Sample
from flora.sharding.outputs import dumps

OUT = REPO / "benchmarks" / "out" / "mixing"
SAMPLES, SPECIES = 8_000, 400
SHARD_SAMPLES = 400  # a few hundred samples a shard (the sharder's default shards.max_samples: 1,000)
VAL_SAMPLES = 64  # the validation split the loaders require; not measured
IMAGE_PX = 16  # tiny images: decoding costs next to nothing, the measurement is about order
JPEG_QUALITY = 90
BATCH, BUFFER = 64, 512  # the buffer is 1/16 of the split: it cannot hide the order of the tars
EPOCHS = 2
SEED = 0
REGION, COUNTRY = "EU_SW", "ES"
MAX_SHARD_BYTES = 1 << 30  # the sharder's default shards.max_bytes: these shards roll at SHARD_SAMPLES
ORDERS = ("flora", "by_species")
POLICIES = {
    "uniform": {},
    "uniform+interleave": {"interleave": True},
    "class_balanced": {"policy": "class_balanced"},
}
BACKENDS = ("dali", "torch")
TITLES = {"flora": "shards in the sharder's order", "by_species": "shards sorted by species"}
#: How far from i.i.d. a reading order may be and still count as mixing like i.i.d. (the issue's "a
#: few percent").
TOLERANCE = 0.05
#: The computed part (``seed_scale``): the seed's scale on 8 ranks, shards of 1,000, buffer 4,096.
SEED_SCALE = {"samples": 900_000, "species": 18_000, "shards": 900, "world": 8, "buffer": 4096, "batch": 128}


# ------------------------------------------------------------------------------------------ shards
def tiny_jpeg(label: int, i: int) -> bytes:
    """A ``IMAGE_PX`` square JPEG: a colour from the species, a corner pixel from the sample."""
    img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), ((37 * label) % 256, (91 * label) % 256, (53 * i) % 256))
    img.putpixel((0, 0), (i % 256, (i // 256) % 256, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def species_name(label: int) -> str:
    return f"Synthetica species{label:04d}"


def sample_of(
    i: int, label: int, split: str, jpg: bytes | None = None, px: int = IMAGE_PX,
    source: str = "benchmarks.mixing", seed: int = SEED,
) -> tuple[int, Sample]:  # fmt: skip
    """(the sharder's rank of the sample in its stream, the sample): record, key and meta as the sharder
    makes them from a catalog record (a URL key, ``SampleMeta.from_record``). ``jpg`` (``px`` square;
    default: ``tiny_jpeg``), ``source`` (the record's, and the URL's host) and ``seed`` (the sharder's
    order) let another benchmark's world use the same records."""
    url = f"http://{source.rsplit('.', 1)[-1]}.invalid/{split}/{i:06d}.jpg"
    jpg = tiny_jpeg(label, i) if jpg is None else jpg
    record = {
        "plant_id": i,
        "latin_name": species_name(label),
        "image_url": url,
        "license": "CC0",
        "license_class": PERMISSIVE,
        "source": source,
        "country": COUNTRY,
        "region": REGION,
        "split": split,
    }
    image = {"width": px, "height": px, "sha256": hashlib.sha256(jpg).hexdigest()}
    meta = SampleMeta.from_record(record, label, image).as_json()
    rank = int.from_bytes(seeded_rank(seed, url_key(url))[:8], "big")
    return rank, Sample(key=safe_key(url_key(url)), jpg=jpg, label=label, meta=meta)


def write_split(root: Path, split: str, samples: list[Sample], shard_samples: int) -> list[dict]:
    """``samples`` in this order into ``split``'s shards of ``shard_samples``, each with its DALI index;
    returns their manifest entries (as the sharder's finalize lists them)."""
    work = root / "_work" / split
    writer = RollingTarWriter(work, split, shard_samples, MAX_SHARD_BYTES)
    for sample in samples:
        writer.write(sample)
    entries = []
    for n, part in enumerate(writer.close()):
        final = root / shard_name(split, REGION, n)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part.path, final)
        write_index(final, part.index)
        entries.append(
            {"path": str(final.relative_to(root)), "split": split, "region": REGION, "samples": part.samples,
             "bytes": final.stat().st_size, "sha256": part.sha256, "classes": sorted(set(part.labels)),
             "licenses": {PERMISSIVE: part.samples}, "chunk": None, "version": None, "tombstones": []}
        )  # fmt: skip
    shutil.rmtree(root / "_work")
    return entries


def write_shard_set(
    root: Path,
    labels: np.ndarray,
    order: str,
    shard_samples: int = SHARD_SAMPLES,
    val_samples: int = VAL_SAMPLES,
) -> Path:
    """A shard root (manifest, class mapping, tars and index files) with one training sample per entry
    of ``labels``, ordered ``flora`` (the sharder's seeded hash order within the split and region) or
    ``by_species`` (sorted by species, then that order), and ``val_samples`` validation samples (the
    same for either order). Returns ``root``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train = [sample_of(i, int(label), "train") for i, label in enumerate(labels)]
    if order == "flora":
        train.sort(key=lambda rs: rs[0])
    else:
        train.sort(key=lambda rs: (rs[1].label, rs[0]))
    rng = np.random.default_rng(SEED)
    val = sorted(
        (sample_of(i, int(rng.choice(labels)), "val") for i in range(val_samples)), key=lambda rs: rs[0]
    )
    shards = write_split(root, "train", [s for _, s in train], shard_samples)
    shards += write_split(root, "val", [s for _, s in val], shard_samples)
    species = int(labels.max()) + 1
    (root / CLASS_MAPPING).write_text(dumps({species_name(k): k for k in range(species)}), encoding="utf-8")
    manifest = {"shards": shards, "class_mapping": CLASS_MAPPING, "version": None, "parent": None}
    (root / MANIFEST).write_text(dumps(manifest), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------ measure
def iid_distinct(epoch_labels: np.ndarray, batch: int) -> float:
    """The expected number of distinct species in ``batch`` entries drawn without replacement from
    ``epoch_labels`` (a batch of a uniform random permutation of the list): the sum over species of
    ``1 - C(L - c, b) / C(L, b)``, the product ``prod_j (L - c - j) / (L - j)`` for the ratio."""
    total = len(epoch_labels)
    counts = np.bincount(epoch_labels).astype(np.float64)
    counts = counts[counts > 0]
    j = np.arange(min(batch, total), dtype=np.float64)
    missing = np.prod(np.clip((total - counts[:, None] - j) / (total - j), 0.0, None), axis=1)
    return float(np.sum(1.0 - missing))


def against_iid(batches: list[np.ndarray], epoch_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct species in each batch of labels, the i.i.d. expectation for a batch of its size drawn
    from ``epoch_labels``)."""
    expected: dict[int, float] = {}
    for size in {len(b) for b in batches}:
        expected[size] = iid_distinct(epoch_labels, size)
    measured = np.array([len(np.unique(b)) for b in batches], dtype=np.float64)
    return measured, np.array([expected[len(b)] for b in batches], dtype=np.float64)


def loader_config(root: Path, backend: str, sampling: dict, batch: int, buffer: int, threads: int) -> dict:
    """The data config of one case (a mapping, as ``create_dataloaders`` takes it)."""
    return {
        "data": {
            "shards": str(root),
            "image_size": IMAGE_PX,
            "batch_size": batch,
            "threads": threads,
            "device": "cpu",
            "shuffle_buffer": buffer,
            "index_cache": "off",
            "backend": backend,
            "seed": SEED,
            "sampling": sampling,
        }
    }


def read_epoch(train, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels, sample ids) of the valid rows of each batch ``train`` yields in ``epoch``."""
    train.set_epoch(epoch)
    batches = []
    for out in train:
        valid = out["valid"]
        if valid.any():
            batches.append((out["label"][valid].cpu().numpy(), out["index"][valid].cpu().numpy()))
    return batches


def measure(root: Path, backend: str, sampling: dict, epochs: int, batch: int, buffer: int) -> dict:
    """Distinct species per batch over ``epochs`` training epochs read through the loader, against the
    i.i.d. expectation for the same epoch lists. For the reference loader, also whether it read exactly
    its plan (``train.order``, which tests/loaders/test_mixing.py measures without reading)."""
    from flora.loaders import create_dataloaders

    train, val, info = create_dataloaders(loader_config(root, backend, sampling, batch, buffer, threads=2))
    if any(info.skipped[split] for split in info.skipped):
        raise SystemExit(f"benchmark set-up: the loader left samples of {root} out: {info.skipped}")
    started = time.perf_counter()
    measured, iid, as_planned = [], [], True
    for epoch in range(epochs):
        batches = read_epoch(train, epoch)
        got, expected = against_iid(
            [b[0] for b in batches], train.index.labels[train.planner.epoch_list(epoch)]
        )
        measured.append(got)
        iid.append(expected)
        if backend == "torch":
            ids = np.concatenate([b[1] for b in batches])
            as_planned = as_planned and bool(np.array_equal(ids, train.order(epoch)[: len(ids)]))
    seconds = time.perf_counter() - started
    train.close()
    val.close()
    m, e = float(np.concatenate(measured).mean()), float(np.concatenate(iid).mean())
    row = {"batches": sum(map(len, measured)), "distinct": m, "iid": e, "ratio": m / e,
           "gap_pct": 100.0 * (m / e - 1.0), "seconds": seconds}  # fmt: skip
    if backend == "torch":
        row["reads_as_planned"] = as_planned
    return row


# ------------------------------------------------------------------------------------------ report
# ------------------------------------------------------------------------------ the seed's scale
class _Layout:
    """What ``reading_window`` reads of an index: shards of ``per_shard`` consecutive sample ids."""

    def __init__(self, n: int, per_shard: int):
        self.per_shard, self.shards = per_shard, [None] * math.ceil(n / per_shard)

    def shards_of(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids) // self.per_shard


def seed_scale(samples: int, species: int, shards: int, world: int, buffer: int, batch: int) -> list[dict]:
    """The reference loader's reading order, computed rather than read (tars are not needed: its order
    is ``train.order(e)``, which it reads exactly, ``reads_as_planned`` above), for rank 0 of ``world``
    at the seed's scale: the epoch list, the rank cut, the plan's reading order (``Planner.rank_plan``'s
    steps: shard by shard for uniform; ``reading_window`` windows for the others), the shuffle buffer.
    Distinct species per batch against i.i.d. batches of the rank's reads, and the plan's runs."""
    labels = zipf_labels(samples, species, seed=SEED)
    per_shard = math.ceil(samples / shards)
    layout = _Layout(samples, per_shard)
    rows = []
    for order in ORDERS:
        lab = np.sort(labels) if order == "by_species" else np.random.default_rng(SEED).permutation(labels)
        for policy, raw in POLICIES.items():
            cfg = from_dict(SamplingConfig, raw, "sampling")
            if cfg.unsampled(samples):  # shards in a shuffled order, each in tar order (index.py)
                shard_order = np.random.default_rng([SEED, 0]).permutation(len(layout.shards))
                listed = np.concatenate([np.arange(i * per_shard, min((i + 1) * per_shard, samples))
                                         for i in shard_order])  # fmt: skip
            else:
                listed = epoch_samples(lab, None, cfg, SEED, 0)
            lo, hi = rank_bounds(len(listed), 0, world)
            reads = listed[lo:hi]
            window = None
            if not cfg.unsampled(samples):
                window = reading_window(layout, reads, buffer)
                reads = reads[window_order(np.arange(len(reads)), reads, window)]
            runs = 1 + int(np.count_nonzero(np.diff(layout.shards_of(reads))))
            read = reads[buffer_shuffle(np.arange(len(reads)), buffer, epoch_seed(SEED, 0, 0, BUFFER_SALT))]
            cut = len(read) // batch * batch
            batches = list(lab[read[:cut]].reshape(-1, batch))
            measured, iid = against_iid(batches, lab[reads])
            ratio = float(measured.mean() / iid.mean())
            rows.append({"shards": order, "policy": policy, "window": window, "reads": len(reads),
                         "reads_per_run": round(len(reads) / runs, 1),
                         "distinct": round(float(measured.mean()), 2), "iid": round(float(iid.mean()), 2),
                         "ratio": round(ratio, 4)})  # fmt: skip
            print(f"  seed scale {order:10s} {policy:18s}: {ratio:.3f} of i.i.d., "
                  f"{rows[-1]['reads_per_run']} reads per run", flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Bars of measured / i.i.d. per policy and backend, one panel per shard order."""
    plt = pyplot()
    orders = list(dict.fromkeys(r["shards"] for r in rows))
    fig, axes = plt.subplots(1, len(orders), figsize=(5.5 * len(orders), 4.0), squeeze=False, sharey=True)
    colours = {"dali": "#4a7f3b", "torch": "#3b5f8a"}
    for ax, order in zip(axes[0], orders, strict=True):
        mine = [r for r in rows if r["shards"] == order]
        policies = list(dict.fromkeys(r["policy"] for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / len(backends)
        for k, backend in enumerate(backends):
            values = [next((r["ratio"] for r in mine if r["policy"] == p and r["backend"] == backend), 0.0)
                      for p in policies]  # fmt: skip
            x = np.arange(len(policies)) + (k - (len(backends) - 1) / 2) * width
            bars = ax.bar(x, values, width, label=backend, color=colours.get(backend))
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhspan(1.0 - TOLERANCE, 1.0 + TOLERANCE, color="#999999", alpha=0.2, linewidth=0)
        ax.set_xticks(np.arange(len(policies)), policies, fontsize=8)
        ax.set_title(TITLES.get(order, order))
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("distinct species per batch / i.i.d.")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"batch {BATCH}, shuffle_buffer {BUFFER}; grey band: within {TOLERANCE:.0%} of i.i.d.",
                 fontsize=9)  # fmt: skip
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--species", type=int, default=SPECIES)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--work", type=Path, default=OUT, help="the two shard sets are written here")
    parser.add_argument("--no-seed-scale", dest="seed_scale", action="store_false",
                        help="skip the computed reading orders at the seed's scale (~1 min)")  # fmt: skip
    args = parser.parse_args(argv)
    labels = zipf_labels(args.samples, args.species, seed=SEED)
    counts = np.bincount(labels, minlength=args.species)
    print(
        f"{len(labels):,} samples, {args.species} species, {counts.max():,} down to {counts.min()} per "
        f"species; shards of {SHARD_SAMPLES}; batch {BATCH}, shuffle_buffer {BUFFER}",
        flush=True,
    )
    started = run_started = time.perf_counter()
    roots = {order: write_shard_set(args.work / order, labels, order) for order in ORDERS}
    print(f"  shards written in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for order, root in roots.items():
        for policy, sampling in POLICIES.items():
            for backend in args.backends:
                row = {"shards": order, "policy": policy, "backend": backend}
                row.update(measure(root, backend, sampling, args.epochs, BATCH, BUFFER))
                rows.append(row)
                print(f"  {order:10s} {policy:18s} {backend:5s}: {row['distinct']:.2f} / {row['iid']:.2f} "
                      f"= {row['ratio']:.3f} ({row['seconds']:.1f} s)", flush=True)  # fmt: skip
    print_table(rows, ["shards", "policy", "backend", "batches", "distinct", "iid", "ratio", "gap_pct"])
    seed_rows = []
    if args.seed_scale:
        print(f"seed scale (computed, the reference loader's order): {SEED_SCALE}", flush=True)
        seed_rows = seed_scale(**SEED_SCALE)
        print_table(seed_rows, ["shards", "policy", "window", "reads_per_run", "distinct", "iid", "ratio"])
    mixed = [r for r in rows if r["policy"] != "uniform" or r["shards"] == "flora"]
    within = all(abs(r["ratio"] - 1.0) <= TOLERANCE for r in mixed)
    result = {
        "benchmark": "mixing",
        "command": command_line("benchmarks.mixing", argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "input": {
            "samples": args.samples,
            "species": args.species,
            "max_per_species": int(counts.max()),
            "min_per_species": int(counts.min()),
            "shard_samples": SHARD_SAMPLES,
            "image_px": IMAGE_PX,
            "batch_size": BATCH,
            "shuffle_buffer": BUFFER,
            "epochs": args.epochs,
            "ranks": 1,
            "train_remainder": "drop",
        },
        "tolerance": TOLERANCE,
        "within_tolerance": {
            "cases": "every policy on flora-order shards; interleave and class_balanced on by_species shards",
            "met": within,
        },
        "seconds": round(time.perf_counter() - run_started, 1),
        "rows": rows,
        "seed_scale": {"input": SEED_SCALE, "rows": seed_rows} if seed_rows else None,
    }
    publish("mixing", result, lambda png: plot(rows, png))
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())
