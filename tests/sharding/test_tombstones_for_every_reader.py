"""Removed and relabelled samples leave the tars: after an incremental build, webdataset's own reader and
DALI's ``fn.readers.webdataset`` (over Flora's ``.idx`` files) see exactly the live samples, each once,
with its current label, as Flora's loaders do; shards without tombstones stay byte for byte; a crash
in the build's swap leaves no manifest and the re-run finishes it; ``--keep-tombstones`` keeps the lazy
way. Over the shared ``small_world`` (its server and images; catalogs and builds made here)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from flora.config import load_config
from flora.io import sha256_file
from flora.loaders.config import load_data_config
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError, build_index
from flora.sharding.__main__ import main
from flora.sharding.catalog.records import url_key
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.sharding.format.schema import safe_key

from .build_settings import TEST_OVERRIDES

SPLITS = ("train", "val", "test")
#: Shards of 10 samples: each stream has several, so some hold a removed sample and some do not.
SETTINGS = [*TEST_OVERRIDES, "processes=1", "shards.max_samples=10"]


def build_cli(splits: Path, out: Path, cache: Path, *extra: str) -> tuple[int, str]:
    """``flora build`` in this process: its exit status and its standard output."""
    argv = ["build", "--splits", str(splits), "--out", str(out), "--cache", str(cache), *extra, *SETTINGS]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    return status, stdout.getvalue()


@pytest.fixture(scope="module")
def grown(small_world, tmp_path_factory):
    """Catalog v1 (all of the small world's records) and v2 (every 7th removed, two relabelled; with
    ``--previous v1``); v1 built; v2 built over a copy of it by ``flora build``."""
    root = tmp_path_factory.mktemp("tombstones")
    rows = small_world.world.records
    species = sorted({r["latin_name"] for r in rows})
    removed = {r["image_url"] for i, r in enumerate(rows) if i % 7 == 3}
    kept = [r for r in rows if r["image_url"] not in removed]
    relabel = {r["image_url"]: next(s for s in species if s != r["latin_name"]) for r in kept[10:40:20]}
    v2_rows = [{**r, "latin_name": relabel.get(r["image_url"], r["latin_name"])} for r in kept]
    cat = load_config(CatalogConfig, None, ["progress=false"])
    for name, chosen in (("v1", rows), ("v2", v2_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    run_catalog(str(root / "v1.jsonl"), root / "splits_v1", cat)
    run_catalog(str(root / "v2.jsonl"), root / "splits_v2", cat, previous=root / "splits_v1")
    cache = root / "cache"
    assert build_cli(root / "splits_v1", root / "v1", cache)[0] == 0
    shutil.copytree(root / "v1", root / "inc")
    status, summary = build_cli(root / "splits_v2", root / "inc", cache)
    assert status == 0, summary
    return SimpleNamespace(
        root=root, cache=cache, summary=summary, removed=removed, relabelled=set(relabel),
        manifest=json.loads((root / "inc" / "manifest.json").read_text()),
    )  # fmt: skip


def snapshot(out: Path) -> dict[str, str]:
    """Tar path -> sha256 of every tar on disk."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.glob("*/*/*.tar"))}


def catalog_labels(splits: Path) -> dict[str, int]:
    """Sample key -> label of a catalog version's records."""
    rows = [json.loads(line) for line in (splits / "dataset_splits.jsonl").read_text().splitlines()]
    return {safe_key(url_key(r["image_url"])): r["label"] for r in rows}


def flora_samples(out: Path, cache_root: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample Flora's loaders select, all splits."""
    got = []
    for split in SPLITS:
        cfg = load_data_config(
            {"data": {"shards": str(out), "index_cache": "off", "cache_root": str(cache_root)}}
        )
        index = build_index(cfg, split)
        got += list(zip(index.keys, index.labels.tolist(), strict=True))
    return got


def webdataset_samples(out: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample webdataset's own reader yields from every tar on disk."""
    import webdataset as wds

    tars = [str(p) for p in sorted(out.glob("*/*/*.tar"))]
    return [
        (s["__key__"], int(s["cls"])) for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)
    ]


def dali_samples(out: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample DALI's ``fn.readers.webdataset`` reads from every tar on disk with
    Flora's ``.idx`` beside it (CPU: ``device_id=None``); the key from the ``json`` member's URL."""
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(out.glob("*/*/*.tar"))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def members():
        cls, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["cls", "json"], dtypes=[types.UINT8, types.UINT8], name="reader", random_shuffle=False,
        )  # fmt: skip
        return cls, meta

    pipe = members()
    pipe.build()
    got = []
    for _ in range(pipe.epoch_size("reader")):
        cls, meta = pipe.run()
        record = json.loads(bytes(meta.at(0)))
        got.append((safe_key(url_key(record["image_url"])), int(bytes(cls.at(0)))))
    return got


def index_keys(tar: Path) -> set[str]:
    """The sample keys an ``.idx`` file lists (its members' names, less their extensions)."""
    lines = tar.with_suffix(".idx").read_text().splitlines()[1:]
    return {token.split(".", 1)[0] for line in lines for token in line.split() if token.endswith(".json")}


def tar_keys(tar: Path) -> set[str]:
    with tarfile.open(tar) as t:
        return {m.name.split(".", 1)[0] for m in t}


def expected(grown) -> list[tuple[str, int]]:
    """(key, label) of the live samples: Flora's loaders' view, checked against catalog v2's labels."""
    live = flora_samples(grown.root / "inc", grown.root / "derived")
    labels = catalog_labels(grown.root / "splits_v2")
    assert all(labels[key] == label for key, label in live), "Flora's loaders give v2's labels"
    assert len(live) == grown.manifest["accounting"]["sharded"]
    return live


def test_the_build_rewrites_only_the_shards_that_held_removed_samples(grown):
    inc, run = grown.manifest, grown.manifest["last_run"]["incremental"]
    before, after = snapshot(grown.root / "v1"), snapshot(grown.root / "inc")
    removed_keys = {safe_key(url_key(u)) for u in grown.removed}
    changed = {safe_key(url_key(u)) for u in grown.removed | grown.relabelled}
    holding = {p for p in before if tar_keys(grown.root / "v1" / p) & changed}
    assert holding and set(before) - holding, "some v1 shards hold a removed sample, some do not"
    assert set(run["rewritten_shards"]) == holding
    assert {p for p in before if after.get(p) != before[p]} == holding, "only those changed on disk"
    assert run["kept_shards"] == len(before) - len(holding) and run["tombstones"] == 0
    assert run["tombstones_dropped"] == run["new_tombstones"] == len(changed)
    assert all(not s["tombstones"] for s in inc["shards"]) and inc["accounting"]["ok"]
    assert set(after) == {s["path"] for s in inc["shards"]}, "no tar on disk that the manifest does not list"
    for s in inc["shards"]:  # each tar as listed, and its .idx listing exactly its samples
        tar = grown.root / "inc" / s["path"]
        assert sha256_file(tar) == s["sha256"] and tar.stat().st_size == s["bytes"]
        assert index_keys(tar) == tar_keys(tar) and not index_keys(tar) & removed_keys
    line = next(ln for ln in grown.summary.splitlines() if ln.startswith("  incremental over "))
    assert f" {len(holding)} rewritten without {len(changed)} removed samples" in line, line


def test_webdataset_reads_each_live_sample_once_with_its_current_label(grown):
    live = expected(grown)
    got = webdataset_samples(grown.root / "inc")
    assert not [k for k, n in Counter(k for k, _ in got).items() if n > 1], "no sample twice"
    assert sorted(got) == sorted(live)
    relabelled = {safe_key(url_key(u)) for u in grown.relabelled}
    assert relabelled <= {k for k, _ in got}, "a relabelled record is read once, with its new label"


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")
def test_dali_reads_each_live_sample_once_with_its_current_label(grown):
    live = expected(grown)
    got = dali_samples(grown.root / "inc")
    assert not [k for k, n in Counter(k for k, _ in got).items() if n > 1], "no sample twice"
    assert sorted(got) == sorted(live)


def test_keep_tombstones_leaves_them_in_the_tars_and_a_later_build_drops_them(grown, tmp_path):
    out = tmp_path / "lazy"
    shutil.copytree(grown.root / "v1", out)
    before = snapshot(out)
    status, summary = build_cli(grown.root / "splits_v2", out, grown.cache, "--keep-tombstones")
    assert status == 0, summary
    lazy = json.loads((out / "manifest.json").read_text())
    run = lazy["last_run"]["incremental"]
    assert (
        run["rewritten_shards"] == []
        and run["tombstones"] == grown.manifest["last_run"]["incremental"]["tombstones_dropped"]
    )
    assert all(snapshot(out)[p] == sha for p, sha in before.items()), "every v1 tar kept byte for byte"
    assert len(webdataset_samples(out)) > len(expected(grown)), "the lazy way: other readers see them"
    assert sorted(flora_samples(out, tmp_path / "derived")) == sorted(expected(grown))
    # the same build again without the flag rewrites them, as the build that never kept them did
    status, summary = build_cli(grown.root / "splits_v2", out, grown.cache)
    assert status == 0, summary
    assert snapshot(out) == snapshot(grown.root / "inc")
    assert sorted(webdataset_samples(out)) == sorted(expected(grown))


def test_a_crash_in_the_swap_leaves_no_manifest_and_the_rerun_finishes(grown, tmp_path, monkeypatch):
    """The manifest goes before the first published tar changes; readers refuse; a re-run finishes."""
    import flora.sharding.build.incremental as incremental

    out = tmp_path / "inc"
    shutil.copytree(grown.root / "v1", out)
    real_replace, swaps = os.replace, []

    def crash_on_the_second_tar(src, dst):
        published = str(dst).endswith(".tar") and "_work" not in str(dst) and os.path.exists(dst)
        if published:  # a published tar replaced (not a new shard's placement: os is one module)
            swaps.append(dst)
            if len(swaps) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(incremental.os, "replace", crash_on_the_second_tar)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert build_cli(grown.root / "splits_v2", out, grown.cache)[0] == 2
    assert "No space left on device" in stderr.getvalue() and len(swaps) == 2
    assert not (out / "manifest.json").exists(), "no manifest over half-swapped tars"
    with pytest.raises(LoaderError, match="no manifest.json"):
        flora_samples(out, tmp_path / "derived")
    monkeypatch.setattr(incremental.os, "replace", real_replace)
    status, summary = build_cli(grown.root / "splits_v2", out, grown.cache)
    assert status == 0, summary
    assert snapshot(out) == snapshot(grown.root / "inc")
    assert sorted(webdataset_samples(out)) == sorted(expected(grown))
    again = build_cli(grown.root / "splits_v2", out, grown.cache)  # a re-run after success: nothing changes
    assert again[0] == 0 and snapshot(out) == snapshot(grown.root / "inc")


def test_a_crash_while_staging_leaves_v1_published_and_whole(grown, tmp_path, monkeypatch):
    """Before the swap is saved nothing published has changed: v1's manifest and tars stand."""
    import flora.sharding.build.incremental as incremental

    out = tmp_path / "inc"
    shutil.copytree(grown.root / "v1", out)
    v1 = json.loads((out / "manifest.json").read_text())

    def full_disk(path, keys):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(incremental, "drop_samples", full_disk)
    with contextlib.redirect_stderr(io.StringIO()):
        assert build_cli(grown.root / "splits_v2", out, grown.cache)[0] == 2
    assert json.loads((out / "manifest.json").read_text()) == v1
    assert all(snapshot(out)[s["path"]] == s["sha256"] for s in v1["shards"])
    monkeypatch.undo()
    assert build_cli(grown.root / "splits_v2", out, grown.cache)[0] == 0
    assert snapshot(out) == snapshot(grown.root / "inc")


def test_a_build_first_finishes_a_compaction_a_crash_interrupted(grown, tmp_path, monkeypatch):
    """``--compact`` over a ``--keep-tombstones`` build crashes mid-swap (no manifest, its copies in the
    work area); the next ``flora build`` finishes that swap before it plans, and readers get v2 once."""
    import flora.sharding.build.incremental as incremental

    out = tmp_path / "lazy"
    shutil.copytree(grown.root / "v1", out)
    assert build_cli(grown.root / "splits_v2", out, grown.cache, "--keep-tombstones")[0] == 0
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".tar") and "_work" not in str(dst):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(incremental.os, "replace", full_disk)
    with contextlib.redirect_stderr(io.StringIO()):
        assert build_cli(grown.root / "splits_v2", out, grown.cache, "--compact")[0] == 2
    assert not (out / "manifest.json").exists() and (out / "_work" / "compact.json").is_file()
    monkeypatch.undo()
    status, summary = build_cli(grown.root / "splits_v2", out, grown.cache)
    assert status == 0, summary
    assert snapshot(out) == snapshot(grown.root / "inc")
    assert sorted(webdataset_samples(out)) == sorted(expected(grown))
