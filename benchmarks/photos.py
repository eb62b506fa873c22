"""Benchmark set-up: real photographs, ~500x375 JPEGs, and shards built from them by the real sharder.

Owns the photographic data of the loader benchmark. Synthetic images decode faster than photos
(flat regions compress to little), so loader rates must also be measured on photographs. Source:
the example images of Debian's ``opencv-doc`` package (fetched with ``apt-get download``, a package
registry, and unpacked with ``dpkg-deb``; no other network). Each benchmark image is a random
500x375 (or 375x500) crop of a downscaled source photo, re-encoded at JPEG quality 90; the set is
then served on loopback and goes through the real catalog and sharder (``resize_shorter_side``
off: the shards keep 500x375), exactly as user data would.

Leaves out: the measuring (loader.py).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

from PIL import Image

PACKAGE = "opencv-doc"
PHOTO_SIZE = (500, 375)  # the typical community photo after a 500 px long-side export
JPEG_QUALITY = 90
#: Fake species for the photo set: labels do not matter to a loader's speed, only their count.
N_CLASSES = 50
COUNTRIES = ["ES", "PT", "FR", "IT", "DE", "US", "BR", "JP"]


def fetch_sources(work: Path) -> list[Path]:
    """The RGB photos of opencv-doc at least 500x375 (downloaded and unpacked once into ``work``)."""
    unpacked = work / "opencv-doc"
    if not unpacked.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        debs = list(work.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=work, capture_output=True, text=True)
            debs = list(work.glob(f"{PACKAGE}_*.deb"))
            if not debs:
                raise SystemExit(
                    f"benchmark set-up: 'apt-get download {PACKAGE}' failed: {proc.stderr.strip()}"
                )
        tmp = work / "opencv-doc.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
        tmp.rename(unpacked)
    return usable_photos(unpacked)


def usable_photos(folder: Path) -> list[Path]:
    """The RGB JPEGs under ``folder`` of at least 500x375 (the sources the benchmark photos are cut from)."""
    sources = []
    for path in sorted(folder.rglob("*.jpg")):
        try:
            with Image.open(path) as img:
                w, h = img.size
                if img.mode == "RGB" and max(w, h) >= PHOTO_SIZE[0] and min(w, h) >= PHOTO_SIZE[1]:
                    sources.append(path)
        except OSError:
            continue
    if not sources:
        raise SystemExit(f"benchmark set-up: no usable photos (RGB JPEG, >= 500x375) in {folder}")
    return sources


def make_photos(sources: list[Path], out: Path, n: int, seed: int = 0, workers: int = 1) -> list[Path]:
    """``n`` random crops of the sources, 500x375 (a quarter portrait), as JPEG files in ``out``.
    Photo ``i`` depends only on (seed, i), so ``workers`` processes make the same set."""
    done = sorted(out.glob("*.jpg"))
    if len(done) >= n:
        return done[:n]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(sources, out / f"{i:06d}.jpg", seed, i) for i in range(n)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_make_photo, jobs, chunksize=64))
    return [_make_photo(job) for job in jobs]


def _make_photo(job: tuple[list[Path], Path, int, int]) -> Path:
    sources, path, seed, i = job
    rng = random.Random(f"{seed}:{i}")
    src = rng.choice(sources)
    w_out, h_out = PHOTO_SIZE if rng.random() < 0.75 else PHOTO_SIZE[::-1]
    with Image.open(src) as img:
        img = img.convert("RGB")
        low = max(w_out / img.width, h_out / img.height)
        scale = rng.uniform(low, max(low, min(1.0, 2.5 * low)))
        img = img.resize((max(w_out, round(img.width * scale)), max(h_out, round(img.height * scale))))
        x, y = rng.randint(0, img.width - w_out), rng.randint(0, img.height - h_out)
        crop = img.crop((x, y, x + w_out, y + h_out))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(path, quality=JPEG_QUALITY)
    return path


def write_catalog(
    photos: list[Path], root: Path, base_url: str, path: Path, seed: int = 0, classes: int = N_CLASSES
) -> None:
    """A catalog JSONL for the photos (URLs relative to the server's ``root``), licenses mixed."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i, photo in enumerate(photos):
            record = {
                "plant_id": 100000 + i,
                "latin_name": f"Photographica species{rng.randrange(classes):02d}",
                "image_url": f"{base_url}/{photo.relative_to(root).as_posix()}",
                "license": rng.choice(["CC-BY", "CC-BY-NC", "CC0"]),
                "source": "opencv-doc",
                "country": rng.choice(COUNTRIES),
            }
            f.write(json.dumps(record) + "\n")


def build_photo_shards(
    work: Path, n: int, sources: list[Path] | None = None, classes: int = N_CLASSES, workers: int = 1
) -> tuple[Path, Path]:
    """(shard root, photo folder): photos made, served, catalogued and sharded (once; reused after).
    ``sources``: the photos to cut from (default: opencv-doc's, fetched into ``work``)."""
    from flora.config import load_config
    from flora.sharding.build.run import BuildConfig, build
    from flora.sharding.catalog.run import run_catalog
    from flora.sharding.config import CatalogConfig
    from world import ImageServer

    photos_dir = work / "photos"
    shards = work / f"shards-{n}"
    photos = make_photos(sources or fetch_sources(work), photos_dir, n, workers=workers)
    if (shards / "manifest.json").is_file():
        return shards, photos_dir
    with ImageServer(photos_dir) as server:
        write_catalog(photos, photos_dir, server.base_url, work / "catalog.jsonl", classes=classes)
        cfg = load_config(CatalogConfig, None, ["progress=false", "split.min_for_stratify=3"])
        run_catalog(str(work / "catalog.jsonl"), work / "splits", cfg)
        overrides = [
            "progress=false",
            "download.allow_networks=[127.0.0.1/32]",
            "images.resize_shorter_side=null",
            # the photos are crops of a few source photographs: near-duplicates by design, which the
            # crop-robust near-duplicate search would (rightly) drop across splits, emptying val
            "near_duplicates.enabled=false",
        ]
        build(work / "splits", shards, load_config(BuildConfig, None, overrides))
    return shards, photos_dir


def build_world_shards(work: Path, n_records: int) -> tuple[Path, Path]:
    """(shard root, image folder) of a sample world as ``make demo`` builds it (synthetic images,
    resized to 256 by the smoke sharder config), built once under ``work``."""
    from flora.config import load_config
    from flora.sharding.build.run import BuildConfig, build
    from flora.sharding.catalog.run import run_catalog
    from flora.sharding.config import CatalogConfig
    from world import ImageServer, build_world

    root = work / f"world-{n_records}"
    shards, images = root / "shards", root / "images"
    if (shards / "manifest.json").is_file():
        return shards, images
    shutil.rmtree(root, ignore_errors=True)
    images.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[1]
    with ImageServer(images) as server:
        world = build_world(root, _world_spec(n_records), base_url=server.base_url)
        for path, fault in world.faults.items():
            server.set_fault(path, fault)
        cfg = load_config(CatalogConfig, repo / "config" / "catalog_smoke.yaml", ["progress=false"])
        run_catalog(str(world.catalog_path), root / "splits", cfg)
        build_cfg = load_config(BuildConfig, repo / "config" / "sharding_smoke.yaml", ["progress=false"])
        build(root / "splits", shards, build_cfg)
    return shards, images


def _world_spec(n_records: int):
    from world import WorldSpec

    return WorldSpec(n_records=n_records, n_species=40, seed=0)
