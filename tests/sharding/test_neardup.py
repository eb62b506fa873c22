"""Near-duplicate detection: the band and cross searches against brute force, the pHash and its crop
hashes on resized / re-encoded / 5%-cropped / distinct images, the keep-the-earliest-split decision,
the config, and real builds through the loopback image server with near-duplicates planted across
and within splits."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flora.config import ConfigError, load_config
from flora.io import read_jsonl, sha256_file
from flora.sharding.build.incremental import stored_hashes
from flora.sharding.build.plan import image_fingerprint
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.cache.image_cache import ImageCache
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.sharding.format.schema import SampleMeta, write_index
from flora.sharding.images.neardup import (
    DEFAULT_THRESHOLD,
    N_CROPS,
    Band,
    NearDupConfig,
    brute_pairs,
    cross_pairs,
    hamming,
    hash_value,
    judge,
    near_pairs,
    perceptual_hash,
    perceptual_hashes,
    plan_bands,
)
from world import ImageServer, render_image

TRAIN, VAL, TEST = 0, 1, 2


def planted_hashes(n: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes, every 5th a copy of the one before with 0..14 bits flipped, and a few
    identical hashes."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for i in range(1, n, 5):
        flips = rng.choice(64, size=int(rng.integers(0, 15)), replace=False)
        h[i] = h[i - 1] ^ np.uint64(sum(1 << int(b) for b in flips))
    h[-3:] = h[0]
    return h


@pytest.mark.parametrize("k", [0, 1, 4, 8, 10, 12])
def test_band_search_equals_brute_force(k):
    h = planted_hashes(1500, seed=k)
    expected = brute_pairs(h, k)
    assert len(expected) > 0
    assert np.array_equal(near_pairs(h, k), expected)  # the planned bands
    # other numbers of bands the pigeonhole allows (2 wide bands only for small k: C(32, <=6) masks)
    for m in sorted({m for m in (2, 3, 4, k + 1) if m <= k + 1 and (m > 2 or k <= 4)}):
        widths = [64 // m + (i < 64 % m) for i in range(m)]
        radii = [(k + 1) // m - 1 + (i < (k + 1) % m) for i in range(m)]
        shifts = np.cumsum([0, *widths[:-1]]).tolist()
        bands = [Band(s, w, r) for s, w, r in zip(shifts, widths, radii, strict=True)]
        assert np.array_equal(near_pairs(h, k, bands), expected), bands


def test_bands_that_break_the_pigeonhole_are_refused():
    with pytest.raises(ValueError, match="sum"):
        near_pairs(planted_hashes(10, 0), 4, [Band(0, 32, 1), Band(32, 32, 1)])  # (1+1)+(1+1) <= 4


def test_a_large_set_plans_wide_bands_and_finds_the_planted_pairs():
    rng = np.random.default_rng(7)
    h = rng.integers(0, 2**64 - 1, size=200_000, dtype=np.uint64, endpoint=True)
    h[1::1000] = h[0::1000] ^ np.uint64(0b1011)  # 200 pairs at distance 3
    bands = plan_bands(h.size, DEFAULT_THRESHOLD)
    assert all(b.width >= 16 for b in bands), bands  # few candidates per lookup, not k + 1 tiny bands
    pairs = near_pairs(h, DEFAULT_THRESHOLD)
    planted = {(i, i + 1) for i in range(0, h.size, 1000)}
    assert planted <= {(a, b) for a, b, _ in pairs.tolist()}
    assert all(d == 3 for a, b, d in pairs.tolist() if (a, b) in planted)


@pytest.mark.parametrize("k", [0, 4, 8, 10])
def test_cross_search_equals_brute_force_and_skips_a_querys_own_entries(k):
    rng = np.random.default_rng(k)
    queries = planted_hashes(400, seed=k)
    index = rng.integers(0, 2**64 - 1, size=2000, dtype=np.uint64, endpoint=True)
    owner = rng.integers(0, queries.size, size=index.size)
    for i in range(0, index.size, 3):  # a third of the index near some query, 0..12 bits away
        flips = rng.choice(64, size=int(rng.integers(0, 13)), replace=False)
        index[i] = queries[owner[i] if i % 2 else (owner[i] + 1) % queries.size] ^ np.uint64(
            sum(1 << int(b) for b in flips)
        )
    dist = np.bitwise_count(queries[:, None] ^ index[None, :])
    q, i = np.nonzero(dist <= k)
    expected = np.stack([q, i, dist[q, i]], axis=1)
    assert len(expected) > 0
    assert np.array_equal(cross_pairs(queries, index, k), expected)
    mine = expected[:, 0] == owner[expected[:, 1]]
    assert mine.any() and not mine.all()
    assert np.array_equal(cross_pairs(queries, index, k, skip=owner), expected[~mine])


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_phash_survives_resize_and_reencode_and_tells_distinct_images_apart():
    names = ["Quercus ilex", "Olea europaea", "Lavandula stoechas", "Pinus pinea"]
    originals = [render_image(name, v, seed=0) for name in names for v in range(5)]
    hashes = [perceptual_hash(data) for data in originals]
    assert all(len(h) == 16 for h in hashes) and hashes == [perceptual_hash(d) for d in originals]
    for data, h in zip(originals, hashes, strict=True):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, ht = img.size
        smaller = jpeg(img.resize((int(w * 0.6), int(ht * 0.6)), Image.Resampling.BICUBIC))
        assert hamming(hash_value(h), hash_value(perceptual_hash(smaller))) <= DEFAULT_THRESHOLD
        assert hamming(hash_value(h), hash_value(perceptual_hash(jpeg(img, 70)))) <= DEFAULT_THRESHOLD
    values = [hash_value(h) for h in hashes]
    distinct = [hamming(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
    assert min(distinct) > DEFAULT_THRESHOLD


def judged_distance(a: bytes, b: bytes) -> tuple[int, int]:
    """(judge's distance: whole x whole and whole x the other's crops, whole x whole alone)."""
    (wa, ca), (wb, cb) = perceptual_hashes(a), perceptual_hashes(b)
    whole = hamming(hash_value(wa), hash_value(wb))
    crossed = [hamming(hash_value(wa), hash_value(c)) for c in cb] + [
        hamming(hash_value(wb), hash_value(c)) for c in ca
    ]
    return min(whole, *crossed), whole


def crop5(img: Image.Image, ox: float, oy: float) -> bytes:
    """5% of the width and height cut, ``ox`` / ``oy`` of it on the left / top."""
    w, h = img.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    left, top = round(dx * ox), round(dy * oy)
    return jpeg(img.crop((left, top, left + w - dx, top + h - dy)))


def test_crop_hashes_catch_5_percent_crops_and_still_tell_distinct_images_apart():
    names = ["Quercus ilex", "Olea europaea", "Lavandula stoechas", "Pinus pinea"]
    originals = [render_image(name, v, seed=1) for name in names for v in range(5)]
    whole, crops = perceptual_hashes(originals[0])
    assert whole == perceptual_hash(originals[0]) and len(crops) == N_CROPS
    assert all(len(c) == 16 for c in crops) and perceptual_hashes(originals[0]) == (whole, crops)
    missed_by_whole = 0
    for data in originals:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for ox, oy in ((0, 0), (1, 1), (1, 0), (0.3, 0.8), (0.5, 0.5)):
            found, by_whole = judged_distance(data, crop5(img, ox, oy))
            assert found <= DEFAULT_THRESHOLD, (ox, oy, found)
            missed_by_whole += by_whole > DEFAULT_THRESHOLD
    assert missed_by_whole > 0  # the whole-image hash alone misses some: the crops find them
    distinct = [judged_distance(a, b)[0] for i, a in enumerate(originals) for b in originals[i + 1 :]]
    assert min(distinct) > DEFAULT_THRESHOLD


def test_judge_matches_a_whole_hash_against_another_samples_crops_in_either_order():
    a = 0x0123456789ABCDEF
    a_crops = [a ^ (0b1111 << (4 * i)) for i in range(N_CROPS)]  # 4 bits from a: its own crops
    b = a_crops[5] ^ 0b11 << 40  # 2 bits from a crop of a, 6 from a itself
    b_crops = [b ^ (0b111 << (48 + i)) for i in range(N_CROPS)]  # 9 bits from a
    hashes = np.array([a, b], dtype=np.uint64)
    crops = np.array(a_crops + b_crops, dtype=np.uint64)
    owner = np.repeat([0, 1], N_CROPS)
    splits = np.array([TRAIN, VAL], dtype=np.uint8)
    assert judge(hashes, splits, 4, "keep") == {}  # whole hashes 6 bits apart
    assert judge(hashes, splits, 4, "keep", crops, owner) == {1: (0, 2)}  # b's whole near a's crop
    assert judge(hashes[::-1], splits, 4, "keep", crops, 1 - owner) == {1: (0, 2)}  # a's crop, b first
    assert judge(hashes, splits, 4, "keep", crops[N_CROPS:], owner[N_CROPS:]) == {}  # a's crops unknown
    # a sample's own crops never make it a duplicate of itself, nor of an identical-hash twin's split
    alone = judge(hashes[:1], splits[:1], 8, "drop", crops[:N_CROPS], owner[:N_CROPS])
    assert alone == {}


def test_the_earliest_split_keeps_its_copy_and_the_closest_kept_sample_is_cited():
    base = 0x0123456789ABCDEF
    hashes = np.array([base, base ^ 0b11, base ^ 0b111, base ^ (2**64 - 1), base ^ 0b1], dtype=np.uint64)
    splits = np.array([TRAIN, VAL, TEST, TEST, TEST], dtype=np.uint8)
    dropped = judge(hashes, splits, 4, "keep")
    assert dropped == {1: (0, 2), 2: (0, 3), 4: (0, 1)}  # sample 3 is far from all: kept
    # a dropped sample is no reason to drop another: 2 is near 1 (distance 1) but 1 is gone
    assert judge(hashes[[0, 1, 2]], splits[[0, 1, 2]], 2, "keep") == {1: (0, 2)}


def test_within_split_is_a_choice():
    base = 0xFEDCBA9876543210
    hashes = np.array([base, base ^ 0b101, base ^ 0b1], dtype=np.uint64)
    splits = np.array([TRAIN, TRAIN, VAL], dtype=np.uint8)
    assert judge(hashes, splits, 4, "keep") == {2: (0, 1)}
    assert judge(hashes, splits, 4, "drop") == {1: (0, 2), 2: (0, 1)}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("near_duplicates.threshold=25", "near_duplicates.threshold must be in 0..24 bits, got 25"),
        ("near_duplicates.threshold=-1", "near_duplicates.threshold must be in 0..24 bits, got -1"),
        ("near_duplicates.within_split=maybe", "near_duplicates.within_split: expected one of"),
        ("near_duplicates.enabled=3", "near_duplicates.enabled"),
    ],
)
def test_config_names_the_key_and_the_bad_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BuildConfig, None, [override])
    assert NearDupConfig().threshold == DEFAULT_THRESHOLD


# ------------------------------------------------------------------------------ builds through the server
OVERRIDES = [
    "progress=false",
    "processes=1",
    "shards.max_samples=8",
    "download.threads=4",
    "download.retries=0",
    "download.allow_networks=[127.0.0.1/32]",
]
SPECIES = ["Quercus ilex", "Olea europaea", "Lavandula stoechas"]


def write_catalog(tmp_path, server):
    """30 distinct world images (10 per species) through the real catalog; returns the split records."""
    rows = []
    for s, name in enumerate(SPECIES):
        for v in range(10):
            file = f"{s}-{v}.jpg"
            (tmp_path / "images" / file).write_bytes(render_image(name, v, seed=3))
            rows.append(
                {"plant_id": len(rows), "latin_name": name, "image_url": server.url(file), "license": "cc0"}
            )
    (tmp_path / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_catalog(str(tmp_path / "catalog.jsonl"), tmp_path / "splits", CatalogConfig(progress=False))
    return read_jsonl(tmp_path / "splits" / "dataset_splits.jsonl")


def plant(tmp_path, records):
    """Overwrites the images of a val and a test record with a smaller / re-encoded copy of a train
    record's image, of a second train record with a smaller copy of a third, and of a second val
    record with a 5% crop of a fourth train record that its whole-image pHash alone misses; returns
    the URLs (the last two: the cropped one and its copy)."""
    by_split = {s: [r["image_url"] for r in records if r["split"] == s] for s in ("train", "val", "test")}
    original, in_train, copied, uncropped = by_split["train"][:4]
    in_val, in_test, cropped = by_split["val"][0], by_split["test"][0], by_split["val"][1]

    def image(url):
        return Image.open(tmp_path / "images" / url.rsplit("/", 1)[1]).convert("RGB")

    def put(url, data):
        (tmp_path / "images" / url.rsplit("/", 1)[1]).write_bytes(data)

    img = image(original)
    put(in_val, jpeg(img.resize((img.width * 6 // 10, img.height * 6 // 10), Image.Resampling.BICUBIC)))
    put(in_test, jpeg(img, quality=70))
    src = image(in_train)
    put(copied, jpeg(src.resize((src.width * 7 // 10, src.height * 7 // 10), Image.Resampling.BICUBIC), 80))
    full = (tmp_path / "images" / uncropped.rsplit("/", 1)[1]).read_bytes()
    crops = [crop5(image(uncropped), ox, oy) for ox, oy in ((1, 1), (0, 0), (1, 0), (0, 1), (0.5, 0.5))]
    put(cropped, next(c for c in crops if judged_distance(full, c)[1] > DEFAULT_THRESHOLD))
    return original, in_val, in_test, in_train, copied, uncropped, cropped


def shard_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*.tar"))}


def test_planted_near_duplicates_across_splits_are_dropped_and_logged(tmp_path):
    (tmp_path / "images").mkdir()
    with ImageServer(tmp_path / "images") as server:
        records = write_catalog(tmp_path, server)
        original, in_val, in_test, in_train, copied, uncropped, cropped = plant(tmp_path, records)
        keep = build(tmp_path / "splits", tmp_path / "keep", load_config(BuildConfig, None, OVERRIDES))
        drop_cfg = load_config(BuildConfig, None, [*OVERRIDES, "near_duplicates.within_split=drop"])
        drop = build(tmp_path / "splits", tmp_path / "drop", drop_cfg)
        off_cfg = load_config(BuildConfig, None, [*OVERRIDES, "near_duplicates.enabled=false"])
        off = build(tmp_path / "splits", tmp_path / "off", off_cfg)

    assert keep["accounting"] == {
        "records_in": 30,
        "sharded": 27,
        "failed": 0,
        "content_duplicates": 3,
        "ok": True,
    }
    assert keep["duplicates_by_reason"] == {"near_duplicate": 3}
    logged = {d["image_url"]: d for d in read_jsonl(tmp_path / "keep" / "duplicates.jsonl")}
    assert set(logged) == {in_val, in_test, cropped}, "only the planted copies; no distinct image matched"
    for url, split, of in (
        (in_val, "val", original),
        (in_test, "test", original),
        (cropped, "val", uncropped),
    ):
        row = logged[url]
        assert row["reason"] == "near_duplicate" and row["split"] == split
        assert row["duplicate_of"]["image_url"] == of and row["duplicate_of"]["split"] == "train"
        assert 0 <= row["distance"] <= DEFAULT_THRESHOLD
        whole = hamming(hash_value(row["phash"]), hash_value(row["duplicate_of"]["phash"]))
        assert row["match"] == ("crop" if url == cropped else "whole")
        assert (row["distance"] == whole) == (row["match"] == "whole")
        assert whole > DEFAULT_THRESHOLD or url != cropped  # the crop: found by a crop hash only
    assert keep["last_run"]["near_duplicates"]["dropped"] == 3

    # within one split: kept by default, dropped with within_split=drop (the later one in plan order)
    assert drop["accounting"]["sharded"] == 26 and drop["duplicates_by_reason"] == {"near_duplicate": 4}
    inside = [d for d in read_jsonl(tmp_path / "drop" / "duplicates.jsonl") if d["split"] == "train"]
    assert len(inside) == 1 and {inside[0]["image_url"], inside[0]["duplicate_of"]["image_url"]} == {
        in_train,
        copied,
    }

    assert off["accounting"]["sharded"] == 30 and off["duplicates_by_reason"] == {}

    # every sample carries its perceptual hashes, the one the log names; a reader of the tar gets the
    # same ones from the stored bytes (what an incremental build computes for a tar from before them)
    metas = {}
    for tar_path in (tmp_path / "keep").glob("*/*/*.tar"):
        mine = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    mine[member.name.split(".")[0]] = SampleMeta.from_json(tar.extractfile(member).read())
        assert stored_hashes(tar_path, set(mine)) == {k: (m.phash, m.phash_crops) for k, m in mine.items()}
        metas.update({m.image_url: (k, m) for k, m in mine.items()})
    assert len(metas) == 27
    assert all(len(m.phash) == 16 and len(m.phash_crops) == N_CROPS for _key, m in metas.values())
    assert metas[original][1].phash == logged[in_val]["duplicate_of"]["phash"]


def test_warm_rebuild_from_a_cache_without_hashes_needs_no_network_and_gives_the_same_shards(tmp_path):
    (tmp_path / "images").mkdir()
    cfg = load_config(BuildConfig, None, [*OVERRIDES, f"cache.path={tmp_path / 'cache'}"])
    with ImageServer(tmp_path / "images") as server:
        records = write_catalog(tmp_path, server)
        plant(tmp_path, records)
        cold = build(tmp_path / "splits", tmp_path / "cold", cfg)
    # the cache as a build before the hash existed left it: metadata without "phash"
    cache = ImageCache.from_config(cfg.cache)
    prefix = image_fingerprint(cfg.images)
    for record in records:
        entry = cache.get(f"{prefix}|{record['image_url']}")
        assert entry is not None and "phash" in entry.meta and "phash_crops" in entry.meta
        old = {k: v for k, v in entry.meta.items() if k not in ("phash", "phash_crops")}
        cache.put(f"{prefix}|{record['image_url']}", entry.data, old)
    cache.close()
    warm = build(tmp_path / "splits", tmp_path / "warm", cfg)  # the server is gone: cache only
    assert warm["last_run"]["from_network"] == 0 and warm["last_run"]["from_cache"] == 30
    assert shard_bytes(tmp_path / "warm") == shard_bytes(tmp_path / "cold")
    assert read_jsonl(tmp_path / "warm" / "duplicates.jsonl") == read_jsonl(
        tmp_path / "cold" / "duplicates.jsonl"
    )
    assert cold["duplicates_by_reason"] == {"near_duplicate": 3}


def only_via_the_originals_crops(original: bytes, copy: bytes) -> bool:
    """Whether ``copy`` is within the threshold of a crop hash of ``original``, and of nothing else."""
    (wo, co), (wc, cc) = perceptual_hashes(original), perceptual_hashes(copy)
    near = [hamming(hash_value(wc), hash_value(c)) <= DEFAULT_THRESHOLD for c in co]
    far = [hamming(hash_value(wo), hash_value(c)) > DEFAULT_THRESHOLD for c in [wc, *cc]]
    return any(near) and all(far)


def drop_json_fields(out: Path, entry: dict, names: tuple[str, ...]) -> None:
    """Rewrites the tar of manifest ``entry`` under ``out`` as an older writer made it, its samples'
    json without the fields ``names``; its index and the entry's sha256 and size follow."""
    path = out / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                data = json.dumps({k: v for k, v in json.loads(data).items() if k not in names}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    write_index(path)
    entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size


def strip_crop_hashes(out):
    """Makes ``out`` a build from before crop hashes: its samples' json without ``phash_crops``, the
    manifest's sha256s and sample format to match."""
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        drop_json_fields(out, entry, ("phash_crops",))
    manifest["build_settings"]["sample_meta"].remove("phash_crops")
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_incremental_build_over_shards_without_crop_hashes_finds_a_new_crop_of_a_kept_sample(tmp_path):
    (tmp_path / "images").mkdir()
    cfg = load_config(BuildConfig, None, [*OVERRIDES, "near_duplicates.within_split=drop"])
    cat = CatalogConfig(progress=False)
    with ImageServer(tmp_path / "images") as server:
        records = write_catalog(tmp_path, server)
        build(tmp_path / "splits", tmp_path / "out", cfg)
        strip_crop_hashes(tmp_path / "out")
        kept_url = records[0]["image_url"]
        full = (tmp_path / "images" / kept_url.rsplit("/", 1)[1]).read_bytes()
        img = Image.open(io.BytesIO(full)).convert("RGB")
        offsets = [(x / 4, y / 4) for x in range(5) for y in range(5)]
        crop = next(c for c in (crop5(img, *o) for o in offsets) if only_via_the_originals_crops(full, c))
        (tmp_path / "images" / "new.jpg").write_bytes(crop)
        rows = [json.loads(line) for line in (tmp_path / "catalog.jsonl").read_text().splitlines()]
        new = {**rows[0], "plant_id": 99, "image_url": server.url("new.jpg")}
        (tmp_path / "v2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, new]))
        run_catalog(str(tmp_path / "v2.jsonl"), tmp_path / "splits_v2", cat, previous=tmp_path / "splits")
        before = {p: p.read_bytes() for p in (tmp_path / "out").glob("*/*/*.tar")}
        v2 = build(tmp_path / "splits_v2", tmp_path / "out", cfg)
    assert v2["last_run"]["incremental"]["kept_shards"] == len(before)  # old-format shards are kept
    assert all(p.read_bytes() == data for p, data in before.items())
    assert v2["accounting"]["records_in"] == 31 and v2["duplicates_by_reason"] == {"near_duplicate": 1}
    (row,) = [
        d for d in read_jsonl(tmp_path / "out" / "duplicates.jsonl") if d["image_url"] == new["image_url"]
    ]
    assert row["match"] == "crop" and row["duplicate_of"]["image_url"] == kept_url  # the kept sample's crops
