"""Sample selection and verification: region and license filters, regional labels, corrupt samples,
the skip reasons (one list), the scan cache, and the epoch plan's rank cut (the same cut DALI's
reader makes)."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from flora.loaders import jpeg
from flora.loaders.config import load_data_config
from flora.loaders.index import LoaderError, buffer_shuffle, build_index, jpeg_size, rank_bounds
from flora.loaders.jpeg import DECODE_ERROR, SKIP_REASONS
from flora.loaders.recheck import verdict
from flora.sharding.format.schema import read_index, write_index

from .conftest import data_cfg


def index_for(shards: Path, split: str = "train", **over):
    return build_index(load_data_config(data_cfg(shards, **over)), split)


def sample_meta(shards: Path) -> dict[str, dict]:
    """key -> the sample's .json, read with tarfile (independently of the loader)."""
    out = {}
    for tar in shards.glob("*/*/*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name.split(".")[0]] = json.loads(t.extractfile(m).read())
    return out


def test_all_samples_of_a_split_by_default(shard_root):
    manifest = json.loads((shard_root / "manifest.json").read_text())
    idx = index_for(shard_root)
    assert len(idx) == sum(s["samples"] for s in manifest["shards"] if s["split"] == "train")
    meta = sample_meta(shard_root)
    assert all(meta[k]["split"] == "train" for k in idx.keys)
    assert [meta[k]["label"] for k in idx.keys] == idx.labels.tolist()
    assert idx.num_classes == len(json.loads((shard_root / "class_mapping.json").read_text()))


def test_region_filter(shard_root):
    meta = sample_meta(shard_root)
    one = index_for(shard_root, region_filter="EU_SW")
    assert {meta[k]["region"] for k in one.keys} == {"EU_SW"}
    assert len(one) == sum(1 for m in meta.values() if m["split"] == "train" and m["region"] == "EU_SW")
    two = index_for(shard_root, region_filter=["EU_SW", "EU_SE"])
    assert {meta[k]["region"] for k in two.keys} == {"EU_SW", "EU_SE"}
    assert len(two) > len(one)


def test_production_only_keeps_permissive_licenses(shard_root):
    meta = sample_meta(shard_root)
    everything = index_for(shard_root)
    permissive = index_for(shard_root, production_only=True)
    assert {meta[k]["license_class"] for k in everything.keys} > {"permissive"}  # the world mixes licenses
    assert {meta[k]["license_class"] for k in permissive.keys} == {"permissive"}
    restrictive = sum(1 for k in everything.keys if meta[k]["license_class"] != "permissive")
    assert len(permissive) == len(everything) - restrictive
    assert permissive.skipped["license_filtered"] == restrictive


def test_regional_label_space(shard_root):
    meta = sample_meta(shard_root)
    regional = json.loads((shard_root / "class_mapping_eu_sw.json").read_text())
    idx = index_for(shard_root, region_filter="EU_SW", label_space="region")
    assert idx.class_mapping == regional
    assert idx.labels.tolist() == [regional[meta[k]["latin_name"]] for k in idx.keys]


def corrupt_member(tar: Path, nth: int, how: str) -> str:
    """Damages the nth sample's jpg in place (same size, so offsets stay valid); returns its key."""
    line = tar.with_suffix(".idx").read_text().splitlines()[1 + nth].split()
    comps = {line[i]: (int(line[i + 1]), int(line[i + 2]), line[i + 3]) for i in range(0, len(line), 4)}
    off, size, name = comps["jpg"]
    data = bytearray(tar.read_bytes())
    if how == "garbage":
        data[off : off + size] = bytes(size)
    else:  # a bit flip deep inside the entropy-coded data: markers intact, sha256 broken
        data[off + size // 2] ^= 0x10
    tar.write_bytes(bytes(data))
    return name.split(".")[0]


def test_corrupt_samples_are_skipped_and_counted(shard_copy):
    tars = sorted((shard_copy / "train").glob("*/*.tar"))
    zeroed = corrupt_member(tars[0], 1, "garbage")
    flipped = corrupt_member(tars[1], 0, "flip")
    full = index_for(shard_copy, verify="full")
    assert zeroed not in full.keys and flipped not in full.keys
    assert full.skipped["sha256_mismatch"] == 2
    assert {(s["key"], s["reason"]) for s in full.skipped_samples} == {
        (zeroed, "sha256_mismatch"),
        (flipped, "sha256_mismatch"),
    }
    header = index_for(shard_copy, verify="header")
    assert zeroed not in header.keys and header.skipped["not_a_jpeg"] == 1
    assert flipped in header.keys  # the header check cannot see a flipped bit: that is what full is for


def test_a_tar_of_another_size_than_the_manifest_says_is_refused(shard_copy):
    tar = sorted((shard_copy / "train").glob("*/*.tar"))[0]
    listed = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[: listed - 5000])
    rel = tar.relative_to(shard_copy).as_posix()
    with pytest.raises(LoaderError) as err:
        index_for(shard_copy, verify="header")  # the size is checked at every level
    assert f"shard {rel}: the manifest lists {listed} bytes" in str(err.value)
    assert f"found {listed - 5000} bytes" in str(err.value)


def test_truncated_shard_without_a_manifest_size_keeps_what_is_intact(shard_copy):
    tar = sorted((shard_copy / "train").glob("*/*.tar"))[0]
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    for entry in manifest["shards"]:  # an older manifest: no size or sha256 to check against
        entry.pop("bytes"), entry.pop("sha256")
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    lines = tar.with_suffix(".idx").read_text().splitlines()[1:]
    last_jpg = [int(x) for x in lines[-1].split()[5:7]]  # cls, then "jpg <offset> <size>"
    tar.write_bytes(tar.read_bytes()[: last_jpg[0] + 10])
    idx = index_for(shard_copy)
    assert idx.skipped["truncated_shard"] == 1
    assert idx.bounds[1] - idx.bounds[0] == len(lines) - 1


def test_a_changed_tar_with_intact_samples_is_refused_under_full(shard_copy):
    """Bytes outside every sample (here the end-of-archive blocks) changed: not bit rot in a sample that
    can be skipped, so ``verify: full`` (which hashes the tar) refuses the shard, naming both digests."""
    tar = sorted((shard_copy / "val").glob("*/*.tar"))[0]
    listed = json.loads((shard_copy / "manifest.json").read_text())
    entry = next(e for e in listed["shards"] if tar.as_posix().endswith(e["path"]))
    data = bytearray(tar.read_bytes())
    data[-10] ^= 0xFF  # inside the trailing zero blocks: tar readers and the samples are unaffected
    tar.write_bytes(bytes(data))
    assert len(data) == entry["bytes"]
    assert len(index_for(shard_copy, split="val", verify="header")) > 0  # header: size only, as listed
    with pytest.raises(LoaderError) as err:
        index_for(shard_copy, split="val", verify="full")
    found = hashlib.sha256(bytes(data)).hexdigest()
    assert f"the manifest lists sha256 {entry['sha256']}" in str(err.value) and f"found {found}" in str(
        err.value
    )


def test_scan_cache_is_used_and_invalidated(shard_copy, tmp_path):
    first = index_for(shard_copy, index_cache="auto", cache_root=str(tmp_path / "cache"))
    cache_files = list((tmp_path / "cache" / "loader_index").glob("shards-*/*.json"))
    assert len(cache_files) == len(first.shards)
    assert not (shard_copy / "_loader_index").exists()  # nothing is written into the shard store
    again = index_for(shard_copy, index_cache="auto", cache_root=str(tmp_path / "cache"))
    assert again.keys == first.keys
    tar = first.shards[0].path
    key = corrupt_member(tar, 0, "flip")  # rewriting the tar changes its mtime: the cache entry is stale
    after = index_for(shard_copy, index_cache="auto", cache_root=str(tmp_path / "cache"))
    assert key not in after.keys and after.skipped["sha256_mismatch"] == 1


def test_rank_cut_is_an_exact_partition():
    for n in (0, 1, 7, 64, 1001):
        for w in (1, 2, 3, 8):
            cuts = [rank_bounds(n, r, w) for r in range(w)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))
            assert max(e - s for s, e in cuts) - min(e - s for s, e in cuts) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        rank_bounds(10, 2, 2)


def test_epoch_plan_shuffles_shards_per_epoch(shard_root):
    idx = index_for(shard_root)
    e0, e1 = idx.shard_order(0, 0, True), idx.shard_order(1, 0, True)
    assert sorted(e0) == sorted(e1) == list(range(len(idx.shards))) and e0 != e1
    assert idx.shard_order(0, 0, True) == e0  # seeded
    assert idx.shard_order(0, 0, False) == list(range(len(idx.shards)))
    halves = [idx.rank_samples(e1, r, 2) for r in range(2)]
    assert sorted(np.concatenate(halves).tolist()) == list(range(len(idx)))


def test_buffer_shuffle_is_a_seeded_permutation():
    s = np.arange(500)
    a, b = buffer_shuffle(s, 64, 1), buffer_shuffle(s, 64, 2)
    assert sorted(a.tolist()) == s.tolist() and not np.array_equal(a, s) and not np.array_equal(a, b)
    assert np.array_equal(a, buffer_shuffle(s, 64, 1))
    # a buffer of 64 cannot move a sample more than 64 places earlier
    assert all(pos >= val - 64 for pos, val in enumerate(a.tolist()))


def test_jpeg_size_reads_the_frame_header(shard_root):
    tar = next((shard_root / "train").glob("*/*.tar"))
    with tarfile.open(tar) as t:
        jpg = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
        meta = json.loads(t.extractfile(jpg.name.replace(".jpg", ".json")).read())
        assert jpeg_size(t.extractfile(jpg).read()) == (meta["width"], meta["height"])
    assert jpeg_size(b"\xff\xd8\xff\xda\x00\x02") is None


# ------------------------------------------------------------------------------------- skip reasons
def tiny_jpeg(width: int = 8, height: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def odd_shards(root: Path) -> Path:
    """A one-tar shard root whose samples each earn one skip reason (key: the reason, or ``ok``)."""
    jpg = tiny_jpeg()
    good = {"latin_name": "Aa", "license_class": "permissive", "width": 8, "height": 6, "label": 0}
    sha = hashlib.sha256(jpg).hexdigest()
    samples = {  # key -> members (cls, jpg, json), in tar order; a missing one is left out
        "ok": ("0", jpg, {**good, "sha256": sha}),
        "missing_jpg": ("0", None, good),
        "bad_json": ("0", jpg, "{not json"),
        "bad_label": ("x", jpg, good),
        "not_a_jpeg": ("0", b"hello", good),
        "no_jpeg_frame": ("0", b"\xff\xd8\xff\xd9", good),
        "size_mismatch": ("0", jpg, {**good, "width": 9}),
        "sha256_mismatch": ("0", jpg, {**good, "sha256": "00" * 32}),
        "license_filtered": ("0", jpg, {**good, "license_class": "restrictive"}),
        "not_in_label_space": ("1", jpg, {**good, "latin_name": "Bb"}),
        "label_out_of_range": ("7", jpg, good),
        "truncated_shard": ("0", jpg, good),  # last: the tar is cut inside its jpg
    }
    tar_path = root / "train" / "EU" / "train-EU-000000.tar"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w") as tar:
        for key, (cls, data, meta) in samples.items():
            members = {
                "cls": cls.encode(),
                "jpg": data,
                "json": meta if isinstance(meta, str) else json.dumps(meta),
            }
            for ext, payload in members.items():
                if payload is not None:
                    payload = payload.encode() if isinstance(payload, str) else payload
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    write_index(tar_path)
    last_jpg = read_index(tar_path)[-1]["jpg"]
    tar_path.write_bytes(tar_path.read_bytes()[: last_jpg[0] + last_jpg[1] // 2])
    entry = {
        "path": "train/EU/train-EU-000000.tar",
        "split": "train",
        "region": "EU",
        "samples": len(samples),
    }
    (root / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    (root / "class_mapping.json").write_text(json.dumps({"Aa": 0, "Bb": 1}))
    (root / "class_mapping_eu.json").write_text(json.dumps({"Aa": 0}))
    return root


def test_every_skip_reason_produced_is_in_the_list(tmp_path):
    root = odd_shards(tmp_path)
    runs = [
        index_for(root, verify="header", production_only=True, region_filter="EU", label_space="region"),
        index_for(root, verify="full"),
    ]
    produced = {s["reason"] for run in runs for s in run.skipped_samples} | {
        r for run in runs for r in run.skipped
    }
    for run in runs:  # each sample is skipped for the reason it was made for, or kept
        assert {(s["key"], s["reason"]) for s in run.skipped_samples} <= {(r, r) for r in SKIP_REASONS}
        assert "ok" in run.keys
    assert runs[0].skipped["license_filtered"] == 1 and "sha256_mismatch" in runs[0].keys  # header: no sha256
    undecodable = (
        b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"
    )
    produced.add(verdict(undecodable, None, "decode"))  # markers and a frame, but no image data
    assert produced == set(SKIP_REASONS)
    assert len(SKIP_REASONS) == len(set(SKIP_REASONS))


def test_runtime_skips_must_name_a_listed_reason(tmp_path):
    import torch

    from flora.loaders.base import EpochLoader

    cfg = load_data_config(data_cfg(odd_shards(tmp_path), verify="full", batch_size=1))
    loader = EpochLoader(build_index(cfg, "train"), cfg, False, 0, 1, torch.device("cpu"))
    loader.skip({0: DECODE_ERROR}, from_epoch=1)
    assert loader.skipped[DECODE_ERROR] == 1 and loader.runtime_skips == {0: (DECODE_ERROR, 1)}
    with pytest.raises(ValueError, match="skip reason must be one of"):
        loader.skip({1: "gremlins"}, from_epoch=1)


def test_the_loaders_spell_skip_reasons_only_in_the_list():
    """Every module that produces a reason uses jpeg.py's named constants, never its own string."""
    import ast

    spelled = {}
    for path in Path(jpeg.__file__).parent.glob("*.py"):
        if path.name != "jpeg.py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in SKIP_REASONS:
                    spelled[path.name] = node.value
    assert spelled == {}
