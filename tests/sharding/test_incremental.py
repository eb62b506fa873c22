"""Incremental builds (issue 17 part 2): a v2 catalog (frozen splits over v1) built over v1's shards keeps
them byte for byte, writes only the new records, tombstones removed and relabelled samples (the loaders
never yield them), equals a full v2 build sample for sample, survives SIGKILL, rebuilds a tampered v1
shard, stays a no-op on a same-splits re-run, and ``--compact`` removes the tombstoned samples."""

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flora.config import load_config
from flora.io import sha256_file
from flora.loaders.config import load_data_config
from flora.loaders.index import build_index
from flora.sharding.__main__ import main
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.catalog.records import url_key
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.sharding.format.schema import safe_key
from world import ImageServer, WorldSpec, build_world

from .test_build import REPO, TEST_OVERRIDES, cli

#: Small shards so that each stream has several and new records make new ones.
SETTINGS = [*TEST_OVERRIDES, "processes=1", "shards.max_samples=20"]
SPLITS = ("train", "val", "test")


def config(cache: Path) -> BuildConfig:
    return load_config(BuildConfig, None, [*SETTINGS, f"cache.path={cache}"])


def catalog_versions(root: Path, v1_rows: list[dict], v2_rows: list[dict]) -> None:
    """``root/splits_v1`` from ``v1_rows`` and ``root/splits_v2`` from ``v2_rows`` grown from it
    (``--previous``: frozen splits), each through a JSONL file beside them."""
    cat = load_config(CatalogConfig, None, ["progress=false"])
    for name, chosen in (("v1", v1_rows), ("v2", v2_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    run_catalog(str(root / "v1.jsonl"), root / "splits_v1", cat)
    run_catalog(str(root / "v2.jsonl"), root / "splits_v2", cat, previous=root / "splits_v1")


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A world; catalog v1 (90% of its records) and v2 (all but a few removed, one relabelled, with
    ``--previous v1``); v1 built; v2 built incrementally over a copy (and over another with
    ``keep_tombstones``: ``lazy``) and in full into a fresh folder."""
    root = tmp_path_factory.mktemp("grown")
    (root / "world" / "images").mkdir(parents=True)
    server = ImageServer(root / "world" / "images")
    spec = WorldSpec(
        n_records=300, n_species=5, seed=3, duplicate_rate=0.0, invalid_rate=0.0, fault_rate=0.03
    )
    w = build_world(root / "world", spec, base_url=server.base_url)
    for path, fault in w.faults.items():
        server.set_fault(path, fault)
    rows = w.records
    v1_rows = [r for i, r in enumerate(rows) if i % 10 != 9]
    removed = {r["image_url"] for i, r in enumerate(v1_rows) if i % 25 == 3}
    crowded = near_neighboured(root / "world" / "images", v1_rows)
    target = next(
        r
        for r in v1_rows[40:]
        if r["image_url"] not in removed
        and urlsplit_path(r["image_url"]) not in w.faults
        and r["image_url"] not in crowded
    )
    relabelled = target["image_url"]
    other = next(r["latin_name"] for r in rows if r["latin_name"] != target["latin_name"])
    v2_rows = [
        {**r, "latin_name": other} if r["image_url"] == relabelled else r
        for r in rows
        if r["image_url"] not in removed
    ]
    catalog_versions(root, v1_rows, v2_rows)
    cache = root / "cache"
    with server:
        v1 = build(root / "splits_v1", root / "v1", config(cache))
        shutil.copytree(root / "v1", root / "inc")  # copy2: the copy keeps the tars' mtimes
        shutil.copytree(cache, root / "cache_v1")  # warm for v1's records only (the SIGKILL test)
        before = snapshot(root / "inc")
        requests = {u: server.request_count(urlsplit_path(u)) for u in (r["image_url"] for r in v1_rows)}
        inc = build(root / "splits_v2", root / "inc", config(cache))
        shutil.copytree(root / "v1", root / "lazy")
        lazy = build(root / "splits_v2", root / "lazy", config(cache), keep_tombstones=True)
        requests_after = {u: server.request_count(urlsplit_path(u)) for u in requests}
        full = build(root / "splits_v2", root / "full", config(cache))
        yield SimpleNamespace(
            root=root, server=server, cache=cache, v1=v1, inc=inc, lazy=lazy, full=full, before=before,
            removed=removed, relabelled=relabelled,
            old_requests=(requests, requests_after),
        )  # fmt: skip


def near_neighboured(images: Path, rows: list[dict], margin: int = 4) -> set[str]:
    """URLs whose image has another within the near-duplicate threshold (+ ``margin`` bits: the build
    hashes its re-encoded copy) as whole or crop hash. The world's synthetic plants of one species
    can come that close, and which of a pair the build keeps depends on the splits, so on the port."""
    from flora.sharding.images.neardup import DEFAULT_THRESHOLD, hamming, hash_value, perceptual_hashes
    from world.images import image_relpath

    hashes = {}
    for r in rows:
        rel = image_relpath(r["image_url"])
        if rel and (path := images / rel).is_file():
            whole, crops = perceptual_hashes(path.read_bytes())
            hashes[r["image_url"]] = (hash_value(whole), [hash_value(c) for c in crops])
    limit = DEFAULT_THRESHOLD + margin
    return {
        a
        for a, (wa, ca) in hashes.items()
        for b, (wb, cb) in hashes.items()
        if a != b
        and min(hamming(x, y) for x, y in [(wa, wb), *((wa, c) for c in cb), *((wb, c) for c in ca)]) <= limit
    }


def urlsplit_path(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).path


def snapshot(out: Path) -> dict[str, tuple[str, int]]:
    """Tar path -> (sha256, mtime_ns) of every published tar."""
    return {
        str(p.relative_to(out)): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(out.glob("*/*/*.tar"))
    }


def loader_samples(out: Path, cache_root: Path) -> dict[str, dict[str, int]]:
    """split -> {sample key: label} as the loaders' index selects them."""
    got = {}
    for split in SPLITS:
        cfg = load_data_config(
            {"data": {"shards": str(out), "index_cache": "off", "cache_root": str(cache_root)}}
        )
        index = build_index(cfg, split)
        got[split] = dict(zip(index.keys, index.labels.tolist(), strict=True))
    return got


def served(manifest: dict) -> dict:
    """split -> region -> samples readers get, from the manifest's totals (streams left empty dropped)."""
    return {
        (split, region): t["samples"]
        for split, regions in manifest["totals"].items()
        for region, t in regions.items()
        if t["samples"]
    }


def catalog_rows(splits: Path) -> dict[str, dict]:
    """Sample key -> record of a catalog version's dataset_splits.jsonl."""
    rows = [json.loads(line) for line in (splits / "dataset_splits.jsonl").read_text().splitlines()]
    return {safe_key(url_key(r["image_url"])): r for r in rows}


def tar_keys(out: Path) -> set[str]:
    keys = set()
    for tar in out.glob("*/*/*.tar"):
        with tarfile.open(tar) as t:
            keys |= {m.name.split(".")[0] for m in t if m.name.endswith(".jpg")}
    return keys


def test_incremental_build_keeps_v1_shards_and_equals_a_full_v2_build(grown):
    root, inc, v1 = grown.root, grown.inc, grown.v1
    after = snapshot(root / "inc")
    rewritten = set(inc["last_run"]["incremental"]["rewritten_shards"])
    for path, (sha, mtime) in grown.before.items():
        if path not in rewritten:
            assert after[path] == (sha, mtime), f"{path} has no tombstone but was rewritten"
    new = set(after) - set(grown.before)
    assert new, "the new records make new shards"
    assert inc["version"] == grown.full["version"] != v1["version"] and inc["parent"] == v1["version"]
    by_path = {s["path"]: s for s in inc["shards"]}
    assert {p for p, s in by_path.items() if s["version"] == inc["version"]} == new | (
        rewritten & set(by_path)
    )
    assert all(by_path[p]["version"] == v1["version"] for p in set(grown.before) - rewritten)
    for path in new:  # new shards after every old index of their stream
        stream = path.rsplit("-", 1)[0]
        old = [int(p.rsplit("-", 1)[1][:6]) for p in grown.before if p.rsplit("-", 1)[0] == stream]
        assert int(path.rsplit("-", 1)[1][:6]) > max(old, default=-1)
    # tombstones: exactly the removed and the relabelled records that v1 had sharded
    v1_keys = tar_keys(root / "v1")
    v1_rows, v2_rows = (catalog_rows(root / f"splits_{v}") for v in ("v1", "v2"))
    gone = {k for k, row in v1_rows.items() if v2_rows.get(k, {}).get("label") != row["label"]} & v1_keys
    relabelled = {k for k in gone if k in v2_rows}
    assert len(relabelled) == 1 and len(gone) > 1, "one relabelled record (removed + new), the rest removed"
    lazy = grown.lazy
    assert gone and {k for s in lazy["shards"] for k in s["tombstones"]} == gone
    assert lazy["last_run"]["incremental"]["new_tombstones"] == len(gone)
    # without keep_tombstones the shards that held them are rewritten without them, and only those
    assert inc["last_run"]["incremental"]["new_tombstones"] == len(gone)
    assert inc["last_run"]["incremental"]["tombstones_dropped"] == len(gone)
    assert all(not s["tombstones"] for s in inc["shards"])
    assert rewritten == {s["path"] for s in lazy["shards"] if s["tombstones"]}
    assert not (gone - relabelled) & tar_keys(root / "inc"), "removed samples left the tars"
    assert inc["last_run"]["incremental"]["rebuilt_shards"] == []
    # only new (and previously failed or relabelled) records were run; no old image was requested again
    requests, requests_after = grown.old_requests
    assert all(requests_after[u] == requests[u] for u in requests if u not in grown.removed)
    assert (
        inc["accounting"]["ok"] and inc["accounting"]["records_in"] == grown.full["accounting"]["records_in"]
    )
    assert inc["accounting"]["sharded"] == grown.full["accounting"]["sharded"]
    assert served(inc) == served(grown.full) == served(lazy)
    cache_root = root / "derived"
    assert loader_samples(root / "inc", cache_root) == loader_samples(root / "full", cache_root)
    assert loader_samples(root / "lazy", cache_root) == loader_samples(root / "full", cache_root)
    cfg = load_data_config({"data": {"shards": str(root / "lazy"), "index_cache": "off"}})
    tombstoned = sum(build_index(cfg, split).tombstoned for split in SPLITS)
    assert tombstoned == len(gone), "tombstones are counted apart from skips"


def test_same_splits_rerun_is_a_no_op_resume(grown, tmp_path):
    out = tmp_path / "inc"
    shutil.copytree(grown.root / "inc", out)
    before = snapshot(out)
    again = build(grown.root / "splits_v2", out, config(grown.cache))
    assert again["last_run"]["chunks_run"] == 0 and again["last_run"]["from_network"] == 0
    assert snapshot(out) == before
    assert {k: again[k] for k in ("shards", "accounting", "version", "parent")} == {
        k: grown.inc[k] for k in ("shards", "accounting", "version", "parent")
    }


def test_compact_drops_tombstoned_samples_and_equals_a_full_v2_build(grown, tmp_path):
    out = tmp_path / "lazy"
    shutil.copytree(grown.root / "lazy", out)
    before = snapshot(out)
    touched = {s["path"] for s in grown.lazy["shards"] if s["tombstones"]}
    argv = ["build", "--compact", "--splits", str(grown.root / "splits_v2"), "--out", str(out), *SETTINGS]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(not s["tombstones"] for s in manifest["shards"])
    assert manifest["accounting"] == grown.lazy["accounting"]
    assert tar_keys(out) == tar_keys(grown.root / "full"), "the tars now hold exactly v2's samples"
    assert snapshot_sha(out) == snapshot_sha(grown.root / "inc"), "as the build's own compaction"
    after = snapshot(out)
    assert all(after[p] == before[p] for p in before if p not in touched and p in after)
    for s in manifest["shards"]:
        assert sha256_file(out / s["path"]) == s["sha256"] and (out / s["path"]).stat().st_size == s["bytes"]
    cache_root = tmp_path / "derived"
    assert loader_samples(out, cache_root) == loader_samples(grown.root / "full", cache_root)
    assert main(argv) == 0 and snapshot(out) == after, "a second --compact has nothing to do"


def test_a_tampered_v1_shard_is_rebuilt_and_counted(grown, tmp_path):
    out = tmp_path / "v1"
    shutil.copytree(grown.root / "v1", out)
    victim = sorted(out.glob("train/*/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's bytes: the tar's sha256 no longer matches
    victim.write_bytes(bytes(data))
    manifest = build(grown.root / "splits_v2", out, config(grown.cache))
    rel = str(victim.relative_to(out))
    assert manifest["last_run"]["incremental"]["rebuilt_shards"] == [rel]
    assert rel not in {s["path"] for s in manifest["shards"]} and not victim.exists()
    assert manifest["accounting"]["ok"]
    cache_root = tmp_path / "derived"
    assert loader_samples(out, cache_root) == loader_samples(grown.root / "full", cache_root)


def test_sigkill_mid_incremental_build_then_rerun(grown, tmp_path):
    """v1 stays readable while the killed v2 build lies there; the re-run finishes v2."""
    out = tmp_path / "v1"
    shutil.copytree(grown.root / "v1", out)
    cache = tmp_path / "cache"
    shutil.copytree(grown.root / "cache_v1", cache)
    cache_root = tmp_path / "derived"
    v1_samples = loader_samples(out, cache_root)
    v1_rows, v2_rows = (catalog_rows(grown.root / f"splits_{v}") for v in ("v1", "v2"))
    faults = json.loads((grown.root / "world" / "faults.json").read_text())
    new = sorted(urlsplit_path(r["image_url"]) for k, r in v2_rows.items() if k not in v1_rows)
    held = next(path for path in new if path not in faults)  # a new record's image: its request is held
    grown.server.set_fault(held, {"kind": "slow", "delay_s": 5.0})
    try:
        argv = cli(grown.root / "splits_v2", out, *SETTINGS[len(TEST_OVERRIDES) :], f"cache.path={cache}")
        argv += ["download.read_timeout_s=10"]
        seen = grown.server.request_count(held)
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and grown.server.request_count(held) == seen:
            if proc.poll() is not None:
                pytest.fail(f"build ended before it could be killed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)  # polling the server's request count, not a synchronisation sleep
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        grown.server.clear_faults()
        for path, fault in json.loads((grown.root / "world" / "faults.json").read_text()).items():
            grown.server.set_fault(path, fault)
    assert json.loads((out / "manifest.json").read_text())["version"] == grown.v1["version"], "killed mid-run"
    assert loader_samples(out, cache_root) == v1_samples, "v1 is still whole after the crash"
    assert main(argv[3:]) == 0
    assert snapshot_sha(out) == snapshot_sha(grown.root / "inc")
    assert loader_samples(out, cache_root) == loader_samples(grown.root / "full", cache_root)


def snapshot_sha(out: Path) -> dict[str, str]:
    return {path: sha for path, (sha, _mtime) in snapshot(out).items()}


def test_loader_scan_results_of_kept_shards_survive_the_incremental_build(grown, tmp_path):
    """The loaders' scan cache is per shard (path, size, mtime): v1's entries serve the kept shards of v2."""
    out = tmp_path / "v1"
    shutil.copytree(grown.root / "v1", out)
    data = {
        "shards": str(out),
        "index_cache": "auto",
        "cache_root": str(tmp_path / "derived"),
        "verify": "full",
    }
    cfg = load_data_config({"data": data})
    first = {split: build_index(cfg, split) for split in SPLITS}
    assert all(len(i.fresh) == len(i.shards) for i in first.values()), "a cold cache scans every shard"
    manifest = build(grown.root / "splits_v2", out, config(grown.cache))
    new = {s["path"] for s in manifest["shards"] if s["version"] == manifest["version"]}
    for split in SPLITS:
        index = build_index(cfg, split)
        assert {index.shards[i].rel for i in index.fresh} == {p for p in new if p.startswith(f"{split}/")}


def test_an_interrupted_compaction_is_finished_by_the_next_one(grown, tmp_path, monkeypatch, capsys):
    """A crash mid-swap leaves no manifest (readers refuse, never a mix); --compact again finishes."""
    import flora.sharding.build.incremental as incremental
    from flora.loaders.index import LoaderError

    out = tmp_path / "lazy"
    shutil.copytree(grown.root / "lazy", out)
    real_replace, swaps = os.replace, []

    def crash_after_one_tar(src, dst):
        if str(dst).endswith(".tar") and "_work" not in str(dst):  # a published tar being replaced
            swaps.append(dst)
            if len(swaps) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(incremental.os, "replace", crash_after_one_tar)
    argv = ["build", "--compact", "--splits", str(grown.root / "splits_v2"), "--out", str(out), *SETTINGS]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    with pytest.raises(LoaderError, match="no manifest.json"):
        loader_samples(out, tmp_path / "derived")
    monkeypatch.setattr(incremental.os, "replace", real_replace)
    assert main(argv) == 0
    assert tar_keys(out) == tar_keys(grown.root / "full")
    assert loader_samples(out, tmp_path / "derived") == loader_samples(
        grown.root / "full", tmp_path / "derived"
    )


def test_rerun_without_the_work_area_keeps_the_manifests_parent(grown, tmp_path):
    """The work area is gone (``--compact`` removes it; a user may): a re-run with v2's splits over v2's
    own manifest keeps every shard and still names v1 as the parent, not v2 itself."""
    out = tmp_path / "inc"
    shutil.copytree(grown.root / "inc", out)
    shutil.rmtree(out / "_work")
    before = snapshot(out)
    again = build(grown.root / "splits_v2", out, config(grown.cache))
    assert again["parent"] == grown.inc["parent"] == grown.v1["version"] != again["version"]
    assert snapshot(out) == before and again["shards"] == grown.inc["shards"]
    assert again["accounting"] == grown.inc["accounting"]
