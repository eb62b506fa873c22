"""The sharder end to end through the real loopback server with faults injected: layout, index files,
manifest, failure reasons, accounting, content dedup, warm-cache rebuilds, determinism, SIGKILL and
resume, --retry-failed, SSRF refusal and the Ray distributor (listening on loopback only)."""

import json
import os
import signal
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from flora.config import load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.sharding.format.schema import INDEX_VERSION
from world import ImageServer

from .build_settings import REPO, TEST_OVERRIDES, cli, config, shard_bytes


def test_accounting_every_record_is_in_exactly_one_place(faulty_world, faulty_shards):
    records = read_jsonl(faulty_world.splits / "dataset_splits.jsonl")
    acc = faulty_shards.manifest["accounting"]
    failures = read_jsonl(faulty_shards.out / "failures.jsonl")
    dups = read_jsonl(faulty_shards.out / "duplicates.jsonl")
    keys = []
    for tar_path in faulty_shards.out.glob("*/*/*.tar"):
        with tarfile.open(tar_path) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".jpg")]
    assert acc["ok"] and acc["records_in"] == len(records)
    assert acc["sharded"] == len(keys) == len(set(keys)), "no sample twice"
    assert len(keys) + len(failures) + len(dups) == len(records)
    urls = {r["image_url"] for r in records}
    assert {f["image_url"] for f in failures} <= urls


def test_each_fault_has_its_reason(faulty_world, faulty_shards):
    expected = {  # fault kind -> the reason its records must get
        "html": "not_an_image",
        "corrupt": "corrupt",
        "tiny": "too_small",
        "bomb": "decompression_bomb",
        "huge": "too_large",
        "redirect_loop": "too_many_redirects",
        "truncated": "truncated",
        "slow": "timeout",
    }
    by_url = {f["image_url"]: f["reason"] for f in read_jsonl(faulty_shards.out / "failures.jsonl")}
    records = read_jsonl(faulty_world.splits / "dataset_splits.jsonl")
    seen = Counter()
    for r in records:
        path = "/" + r["image_url"].split("/", 3)[3].split("?")[0]
        fault = faulty_world.world.faults.get(path)
        if fault is None:
            continue
        kind = fault["kind"]
        if kind in expected:
            assert by_url.get(r["image_url"]) == expected[kind], (kind, r["image_url"])
            seen[kind] += 1
        elif kind == "status":
            code = fault["status"]
            want = {404: "http_404", 403: "http_403", 410: "http_410"}.get(
                code, "http_5xx" if code >= 500 else f"http_{code}"
            )
            assert by_url.get(r["image_url"]) == want
            seen[kind] += 1
        elif kind == "flaky":
            assert r["image_url"] not in by_url, "a flaky URL succeeds on retry"
            seen[kind] += 1
        elif kind == "redirect":
            loc = fault["location"]
            want = None if loc.startswith("/") else {"ftp": "bad_scheme", "http": None}[loc.split(":")[0]]
            if "169.254" in loc:
                want = "blocked_address"
            elif "invalid" in loc:
                want = "dns_error"
            assert by_url.get(r["image_url"]) == want, loc
            seen[kind] += 1
    assert len(seen) >= 8, f"the world should exercise most fault kinds, saw {dict(seen)}"


def test_layout_samples_and_index_files(faulty_world, faulty_shards, tmp_path):
    from wds2idx import IndexCreator  # DALI's own index writer, the reference for our format

    mapping = json.loads((faulty_shards.out / "class_mapping.json").read_text())
    shards = faulty_shards.manifest["shards"]
    assert shards
    for shard in shards:
        path = faulty_shards.out / shard["path"]
        split, region = path.parent.parent.name, path.parent.name
        assert path.name.startswith(f"{split}-{region}-") and len(path.stem.rsplit("-", 1)[1]) == 6
        assert shard["samples"] <= 40
        ours = path.with_suffix(".idx").read_text()
        ref = tmp_path / "ref.idx"
        with IndexCreator(str(path), str(ref), verbose=False) as creator:
            creator.create_index()
        assert ours == ref.read_text()
        assert ours.startswith(f"{INDEX_VERSION} {shard['samples']}\n")
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uname == "flora" for m in members)
            names = [m.name for m in members]
            stems = {n.split(".")[0] for n in names}
            assert all(n.split(".")[1] in ("cls", "jpg", "json") for n in names) and len(names) == 3 * len(
                stems
            )
            for stem in stems:
                assert stem.isalnum() and "/" not in stem and ".." not in stem
                meta = json.loads(tar.extractfile(f"{stem}.json").read())
                cls = int(tar.extractfile(f"{stem}.cls").read())
                assert mapping[meta["latin_name"]] == cls == meta["label"]
                assert (meta["split"], meta["region"]) == (split, region)
                assert min(meta["width"], meta["height"]) <= 128
                for key in ("image_url", "license", "license_class", "source", "plant_id", "sha256"):
                    assert key in meta


def test_manifest_describes_each_shard(faulty_shards):
    import hashlib

    totals = Counter()
    for shard in faulty_shards.manifest["shards"]:
        path = faulty_shards.out / shard["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert path.stat().st_size == shard["bytes"]
        totals[(shard["split"], shard["region"])] += shard["samples"]
        assert shard["classes"] == sorted(set(shard["classes"]))
        assert sum(shard["licenses"].values()) == shard["samples"]
    for split, regions in faulty_shards.manifest["totals"].items():
        for region, t in regions.items():
            assert t["samples"] == totals[(split, region)]


def test_warm_cache_rebuild_needs_no_network_and_gives_identical_shards(
    faulty_world, faulty_shards, tmp_path
):
    before = faulty_world.server.request_count()
    manifest = build(faulty_world.splits, tmp_path / "again", config(faulty_shards.cache))
    assert faulty_world.server.request_count() == before, "a warm cache makes no request at all"
    assert manifest["last_run"]["from_network"] == 0
    lookups = manifest["last_run"]["cache"]
    assert lookups["misses"] == 0 and lookups["hits"] == manifest["accounting"]["records_in"]
    assert shard_bytes(tmp_path / "again") == shard_bytes(faulty_shards.out)
    assert read_jsonl(tmp_path / "again" / "failures.jsonl") == read_jsonl(
        faulty_shards.out / "failures.jsonl"
    )


def test_same_shards_whatever_the_process_and_thread_count(faulty_world, faulty_shards, tmp_path):
    build(
        faulty_world.splits,
        tmp_path / "par",
        config(faulty_shards.cache, "processes=2", "download.threads=3"),
    )
    assert shard_bytes(tmp_path / "par") == shard_bytes(faulty_shards.out)


def test_content_duplicates_are_written_once_and_logged(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from world import render_image

    data = render_image("Olea europaea", 1, seed=0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(data)
    (images / "d.jpg").write_bytes(render_image("Olea europaea", 2, seed=0))
    with ImageServer(images) as srv:
        rows = [
            {"plant_id": i, "latin_name": "Olea europaea", "image_url": srv.url(n), "license": "cc0"}
            for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
        ]
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_catalog(str(tmp_path / "c.jsonl"), tmp_path / "splits", CatalogConfig(progress=False))
        manifest = build(tmp_path / "splits", tmp_path / "shards", config(tmp_path / "cache"))
    dups = read_jsonl(tmp_path / "shards" / "duplicates.jsonl")
    assert manifest["accounting"] == {
        "records_in": 4,
        "sharded": 2,
        "failed": 0,
        "content_duplicates": 2,
        "ok": True,
    }
    assert len(dups) == 2 and {d["reason"] for d in dups} == {"same_content"}
    kept = dups[0]["duplicate_of"]
    assert all(d["duplicate_of"] == kept for d in dups)
    # splits are processed train -> val -> test: a copy in train is kept, evaluation loses it
    order = {"train": 0, "val": 1, "test": 2}
    assert all(order[kept["split"]] <= order[d["split"]] for d in dups)


def test_without_allow_network_loopback_is_refused(faulty_world, tmp_path):
    before = faulty_world.server.request_count()
    cfg = load_config(BuildConfig, None, [*TEST_OVERRIDES[:-1], "processes=1"])
    manifest = build(faulty_world.splits, tmp_path / "ssrf", cfg)
    assert faulty_world.server.request_count() == before, "no request may reach a refused address"
    assert manifest["accounting"]["sharded"] == 0
    assert set(manifest["failures_by_reason"]) <= {"blocked_address"}


def one_species_world(tmp_path: Path, n: int) -> ImageServer:
    """``n`` distinct images of one species behind a (not yet started) server, and their splits."""
    from world import render_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(n):
        (images / f"{i}.jpg").write_bytes(render_image("Pinus pinea", i, seed=1))
    srv = ImageServer(images)
    rows = [
        {"plant_id": i, "latin_name": "Pinus pinea", "image_url": srv.url(f"{i}.jpg"), "license": "cc-by"}
        for i in range(n)
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_catalog(str(tmp_path / "c.jsonl"), tmp_path / "splits", CatalogConfig(progress=False))
    return srv


def test_retry_failed_adds_recovered_records_to_new_shards(tmp_path):
    with one_species_world(tmp_path, 6) as srv:
        srv.set_fault("/2.jpg", {"kind": "status", "status": 404})
        srv.set_fault("/4.jpg", {"kind": "status", "status": 503})
        first = build(tmp_path / "splits", tmp_path / "shards", config(tmp_path / "cache"))
        assert first["failures_by_reason"] == {"http_404": 1, "http_5xx": 1}
        shards_before = shard_bytes(tmp_path / "shards")
        srv.clear_faults()
        counts = {p: srv.request_count(p) for p in ("/0.jpg", "/2.jpg", "/4.jpg")}
        assert (
            main(
                [
                    "build",
                    "--splits",
                    str(tmp_path / "splits"),
                    "--out",
                    str(tmp_path / "shards"),
                    "--retry-failed",
                    *TEST_OVERRIDES,
                    "processes=1",
                    f"cache.path={tmp_path / 'cache'}",
                ]
            )
            == 0
        )
        assert srv.request_count("/0.jpg") == counts["/0.jpg"], "only failed records are re-attempted"
        assert srv.request_count("/2.jpg") == counts["/2.jpg"] + 1, (
            "a cached 404 is bypassed by --retry-failed"
        )
        assert srv.request_count("/4.jpg") == counts["/4.jpg"] + 1
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["accounting"] == {
        "records_in": 6,
        "sharded": 6,
        "failed": 0,
        "content_duplicates": 0,
        "ok": True,
    }
    assert read_jsonl(tmp_path / "shards" / "failures.jsonl") == []
    after = shard_bytes(tmp_path / "shards")
    assert all(after[name] == data for name, data in shards_before.items()), (
        "existing shards are kept as they were"
    )
    assert len(after) > len(shards_before)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_shards(faulty_world, faulty_shards, tmp_path):
    """Kill a build in the middle (after some chunks finished), run it again, compare bytes."""
    out = tmp_path / "killed"
    argv = cli(
        faulty_world.splits, out, "processes=1", f"cache.path={tmp_path / 'cache'}", "download.threads=2"
    )
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("_work/*/*/*/chunk.json"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"build ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before finalize: nothing may look complete"
    assert main(argv[3:]) == 0
    assert shard_bytes(out) == shard_bytes(faulty_shards.out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["chunks_reused"] >= 2 and manifest["accounting"]["ok"]


@pytest.mark.slow
def test_ray_distributor(faulty_world, faulty_shards, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from flora.sharding.build import distribute

    from .listening import descendants, listening

    real, seen = distribute.DISTRIBUTORS["ray"], []

    def observed(*args, **kwargs):  # the real distributor; the sockets are read while Ray is up
        for item in real(*args, **kwargs):
            if not seen:
                seen.extend(listening(descendants(os.getpid())))
            yield item

    monkeypatch.setitem(distribute.DISTRIBUTORS, "ray", observed)
    cfg = config(faulty_shards.cache, "distributor=ray", "processes=2")
    manifest = build(faulty_world.splits, tmp_path / "ray", cfg)
    assert manifest["last_run"]["distributor"] == "ray"
    assert shard_bytes(tmp_path / "ray") == shard_bytes(faulty_shards.out)
    names = " ".join(s.name for s in seen)
    assert "gcs_server" in names and "raylet" in names, f"Ray's servers were not found: {seen}"
    assert not [s for s in seen if not s.loopback], f"listening beyond loopback: {seen}"


def test_a_small_cache_evicts_and_the_shards_stay_the_same(faulty_world, faulty_shards, tmp_path):
    manifest = build(
        faulty_world.splits, tmp_path / "small", config(tmp_path / "cache", "cache.max_bytes=300000")
    )
    assert manifest["last_run"]["cache"]["evictions"] > 0
    assert shard_bytes(tmp_path / "small") == shard_bytes(faulty_shards.out)


@pytest.mark.slow
def test_two_sharders_on_one_cache_at_once(faulty_world, faulty_shards, tmp_path):
    procs = [
        subprocess.Popen(
            cli(
                faulty_world.splits,
                tmp_path / name,
                "processes=2",
                f"cache.path={tmp_path / 'shared-cache'}",
                "cache.max_bytes=2000000",
            ),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("one", "two")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") == shard_bytes(faulty_shards.out)


def test_missing_splits_is_one_error_line(tmp_path, capsys):
    assert main(["build", "--splits", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora build: error: no dataset_splits.jsonl in") and err.count("\n") == 1


def test_a_crashed_retry_round_is_resumed_not_repeated(tmp_path, monkeypatch):
    from flora.sharding.build import run as build_module

    with one_species_world(tmp_path, 4) as srv:
        srv.set_fault("/1.jpg", {"kind": "status", "status": 404})
        build(tmp_path / "splits", tmp_path / "shards", config(tmp_path / "cache"))
        srv.clear_faults()

        def crash(*args, **kwargs):
            raise KeyboardInterrupt("killed before finalize")

        monkeypatch.setattr(build_module, "finalize", crash)
        with pytest.raises(KeyboardInterrupt):
            build(tmp_path / "splits", tmp_path / "shards", config(tmp_path / "cache"), retry_failed=True)
        monkeypatch.undo()
        manifest = build(
            tmp_path / "splits", tmp_path / "shards", config(tmp_path / "cache"), retry_failed=True
        )
    assert manifest["accounting"] == {
        "records_in": 4,
        "sharded": 4,
        "failed": 0,
        "content_duplicates": 0,
        "ok": True,
    }
    assert manifest["retry_rounds"] == 1 and manifest["last_run"]["repeated_records_dropped"] == 0


def test_retry_failed_refuses_failures_of_another_catalog(faulty_world, faulty_shards, tmp_path, capsys):
    import shutil

    shutil.copytree(faulty_shards.out, tmp_path / "shards", ignore=shutil.ignore_patterns("_work"))
    other = tmp_path / "splits"
    shutil.copytree(faulty_world.splits, other)
    lines = (other / "dataset_splits.jsonl").read_text().splitlines(keepends=True)
    (other / "dataset_splits.jsonl").write_text("".join(lines[1:]))  # the catalog changed
    assert main(["build", "--splits", str(other), "--out", str(tmp_path / "shards"), "--retry-failed",
                 *TEST_OVERRIDES]) == 2  # fmt: skip
    assert "belongs to another catalog" in capsys.readouterr().err


def test_a_new_allow_list_re_attempts_what_the_old_one_refused(faulty_world, tmp_path):
    cfg = load_config(
        BuildConfig, None, [*TEST_OVERRIDES[:-1], "processes=1", f"cache.path={tmp_path / 'c'}"]
    )
    first = build(faulty_world.splits, tmp_path / "s", cfg)
    assert first["accounting"]["sharded"] == 0
    second = build(
        faulty_world.splits, tmp_path / "s", config(tmp_path / "cache")
    )  # same splits, loopback now allowed
    assert second["accounting"]["sharded"] > 0 and "blocked_address" not in second["failures_by_reason"]


def test_allow_network_flag_is_validated_as_its_config_key(tmp_path, capsys):
    (tmp_path / "splits").mkdir()
    code = main(["build", "--splits", str(tmp_path / "splits"), "--out", str(tmp_path / "o"),
                 "--allow-network", "300.1.2.3/99"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("flora build: error: download.allow_networks: not a CIDR network: '300.1.2.3/99'")


CACHE_IS_A_FILE = "is a file; expected a directory (the LMDB cache folder)"


def test_cache_flag_pointing_at_a_file_is_one_error_line(tmp_path):
    one_species_world(tmp_path, 2)  # a real catalog's splits
    cache_file = tmp_path / "cache.mdb"
    cache_file.write_bytes(b"an LMDB data file, not its folder")
    argv = cli(tmp_path / "splits", tmp_path / "out", "processes=1")
    proc = subprocess.run(
        [*argv, f"--cache={cache_file}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr == f"flora build: error: --cache {cache_file} {CACHE_IS_A_FILE}\n"
    assert not (tmp_path / "out").exists() and cache_file.read_bytes() == b"an LMDB data file, not its folder"


def test_cache_path_key_gets_the_same_validation(tmp_path, capsys):
    (tmp_path / "splits").mkdir()
    cache_file = tmp_path / "cache.mdb"
    cache_file.write_bytes(b"x")
    (tmp_path / "sharding.yaml").write_text(f"cache:\n  path: {cache_file}\n")
    argv = ["build", "--splits", str(tmp_path / "splits"), "--out", str(tmp_path / "out")]
    sub = cache_file / "sub"
    cases = [
        ([f"cache.path={cache_file}"], f"cache.path {cache_file} {CACHE_IS_A_FILE}"),
        (["--config", str(tmp_path / "sharding.yaml")], f"cache.path {cache_file} {CACHE_IS_A_FILE}"),
        ([f"cache.path={sub}"], f"cache.path {sub}: {cache_file} {CACHE_IS_A_FILE}"),
        (["--cache", str(sub)], f"--cache {sub}: {cache_file} {CACHE_IS_A_FILE}"),
    ]
    for extra, message in cases:
        assert main([*argv, *extra]) == 2, extra
        assert capsys.readouterr().err == f"flora build: error: {message}\n"
    assert not (tmp_path / "out").exists()
