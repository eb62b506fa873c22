"""``flora build --out s3://bucket/prefix`` against a real S3 server on 127.0.0.1 (SeaweedFS, the
``s3_bucket`` fixture): the published set equals a local build byte for byte; a re-run uploads
nothing; a crash mid-publication never shows readers an old manifest over new objects and a re-run
finishes; incremental builds upload only new and rewritten shards; a chunk run on another node comes
through the store; throttling (503 SlowDown) is retried; a missing bucket, refused credentials, an unreachable
endpoint and another data set's prefix are one error line, exit 2, nothing written."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.loader_s3 import CountingProxy
from flora import store
from flora.sharding.__main__ import main
from flora.sharding.build import distribute
from flora.sharding.build.run import build
from flora.sharding.format.schema import read_table, sample_rows, table_name
from flora.store import S3Url

from .build_settings import TEST_OVERRIDES, config
from .test_incremental import config as incremental_config
from .test_incremental import grown  # noqa: F401 - the fixture: catalogs v1 and v2, built locally

pytestmark = pytest.mark.s3


@pytest.fixture
def world(faulty_world, faulty_shards):
    """The sharder tests' world (every fault kind) and its local build, with the cache that build
    filled: builds to S3 download nothing and compare with it (tests/sharding/conftest.py)."""
    return SimpleNamespace(
        splits=faulty_world.splits,
        local=faulty_shards.out,
        manifest=faulty_shards.manifest,
        cache=faulty_shards.cache,
    )


def published(url: str) -> dict[str, bytes]:
    """Every object under ``url`` by relative key."""
    base = S3Url.parse(url)
    return {key: store.read_bytes(base.join(key)) for key, _ in store.list_objects(base)}


def local_files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] not in ("_work", "_build.lock")
    }


def assert_same_set(url: str, out: Path) -> None:
    """The store holds exactly the local folder's published files (shards, indices, logs byte-equal)
    and a sample table beside each tar that describes the tar object there (its ETag, sha256, rows)."""
    objects, files = published(url), local_files(out)
    tables = {name: objects.pop(name) for name in list(objects) if name.endswith(".samples.json")}
    assert set(objects) == set(files)
    shards = json.loads(objects["manifest.json"])["shards"]
    assert set(tables) == {table_name(s["path"]) for s in shards}
    for shard in shards:
        table = read_table(tables[table_name(shard["path"])])
        etag = store.head(S3Url.parse(url).join(shard["path"]))["etag"].strip('"')
        assert (table["tar_sha256"], table["tar_bytes"], table["tar_etag"]) == (
            shard["sha256"],
            shard["bytes"],
            etag,
        )
        assert table["rows"] == sample_rows(out / shard["path"], shard["sha256"])
        assert (
            len(table["rows"]) == shard["samples"]
        )  # tombstoned ones too (--keep-tombstones): readers skip them
    for name, data in files.items():
        if name != "manifest.json":  # its last_run differs (timings)
            assert objects[name] == data, name
    ours, theirs = json.loads(objects["manifest.json"]), json.loads(files["manifest.json"])
    assert ours["shards"] == theirs["shards"] and ours["accounting"] == theirs["accounting"]


def test_build_to_s3_equals_the_local_build_and_a_rerun_uploads_nothing(world, s3_bucket):
    url = f"s3://{s3_bucket}/flora/shards"
    manifest = build(world.splits, url, config(world.cache))
    assert manifest["published"]["uploaded"] > 0 and manifest["published"]["deleted"] == 0
    assert_same_set(url, world.local)
    again = build(world.splits, url, config(world.cache))
    assert again["published"]["uploaded"] == 0, "nothing differs, so nothing is uploaded again"
    assert manifest["published"]["tables"] == len(manifest["shards"]) and again["published"]["tables"] == 0


def test_a_crash_mid_publication_hides_the_old_manifest_and_a_rerun_finishes(
    world, s3_bucket, tmp_path, monkeypatch
):
    url = f"s3://{s3_bucket}/crash"
    build(world.splits, url, config(world.cache))
    smaller = ("shards.max_samples=25",)  # another plan: objects the manifest lists are overwritten
    real, calls = store.upload_file, []

    def failing(path, target, metadata=None):
        calls.append(target)
        if len(calls) > 3:
            raise store.StoreError(f"injected: connection lost uploading {target}")
        return real(path, target, metadata)

    monkeypatch.setattr(store, "upload_file", failing)
    with pytest.raises(store.StoreError, match="injected"):
        build(world.splits, url, config(world.cache, *smaller))
    assert store.read_bytes(S3Url.parse(url).join("manifest.json")) is None, (
        "readers must not see the old manifest over partly replaced objects"
    )
    monkeypatch.setattr(store, "upload_file", real)
    done = build(world.splits, url, config(world.cache, *smaller))
    assert done["accounting"]["ok"]
    full = build(world.splits, tmp_path / "local25", config(world.cache, *smaller))
    assert_same_set(url, tmp_path / "local25")
    assert len(full["shards"]) != len(world.manifest["shards"])


def test_incremental_build_to_s3_uploads_only_the_new_shards(
    grown,  # noqa: F811
    s3_bucket,
    tmp_path,
    monkeypatch,
):
    """v2 is built on "another driver machine" (an empty cache root): it first downloads v1's
    published set into its staging folder, then builds incrementally over it."""
    url = f"s3://{s3_bucket}/grown"
    v1 = build(grown.root / "splits_v1", url, incremental_config(grown.cache))
    base = S3Url.parse(url)
    etags = {s["path"]: store.head(base.join(s["path"]))["etag"] for s in v1["shards"]}
    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path / "new-driver"))
    v2 = build(grown.root / "splits_v2", url, incremental_config(grown.cache))
    rewritten = set(v2["last_run"]["incremental"]["rewritten_shards"])  # held a removed sample
    assert rewritten and v2["last_run"]["incremental"]["kept_shards"] == len(v1["shards"]) - len(rewritten)
    new = {s["path"] for s in v2["shards"]} - set(etags)
    assert new and v2["parent"] == v1["version"]
    untouched = {p: etag for p, etag in etags.items() if p not in rewritten}
    assert {p: store.head(base.join(p))["etag"] for p in untouched} == untouched, (
        "v1 shards without removed samples are not uploaded again"
    )
    shards_uploaded = v2["published"]["uploaded"] - sum(
        1 for k in local_files(grown.root / "inc") if "/" not in k
    )
    changed = len(new) + len(rewritten & {s["path"] for s in v2["shards"]})  # a shard left empty goes
    assert shards_uploaded <= 2 * changed, "at most the new and rewritten tars and their indices (+ the logs)"
    assert v2["published"]["tables"] == changed, "the other v1 shards' sample tables are kept"
    assert_same_set(url, grown.root / "inc")


def test_a_chunk_run_on_another_node_comes_through_the_store(world, s3_bucket, tmp_path, monkeypatch):
    """Jobs run in this process but with another cache root, as on a node without the driver's staging
    folder: each re-roots, reads the splits from the store, ships its chunk; the driver fetches it."""
    url = f"s3://{s3_bucket}/nodes"
    elsewhere, shipped = tmp_path / "other-node", []

    def other_node(fn, jobs, processes, **_):
        for job in jobs:
            with monkeypatch.context() as m:
                m.setenv("FLORA_CACHE_DIR", str(elsewhere))
                result = fn(job)
            shipped.append(job.chunk_id)
            yield job, result

    monkeypatch.setitem(distribute.DISTRIBUTORS, "ray", other_node)
    manifest = build(world.splits, url, config(world.cache, "distributor=ray"))
    assert shipped and manifest["accounting"]["ok"]
    assert list(elsewhere.glob("staging/*/_work/*/*/*/chunk.json")), "the job worked on its own node"
    assert_same_set(url, world.local)
    keys = [k for k, _ in store.list_objects(S3Url.parse(url))]
    assert not [k for k in keys if k.startswith("_work/")], "the store's work area goes once published"


def test_throttling_is_retried_not_fatal(world, s3_bucket, monkeypatch):
    import os

    from botocore.retries.standard import ExponentialBackoff

    # botocore waits up to 1 s x 2**retry after a throttling answer (its "standard" retry mode, which
    # flora's store sets; the wait is botocore's, no setting of flora's): a hundredth of that here.
    # What is retried and how many times is untouched.
    scales = ExponentialBackoff._DEFAULT_BACKOFF_CONFIG
    monkeypatch.setitem(scales, "throttling_base_scale", scales["throttling_base_scale"] / 100)
    server = os.environ["AWS_ENDPOINT_URL"]
    with CountingProxy(server, throttle_every=3, throttle_any=True) as proxy:  # 503 SlowDown to every 3rd
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        url = f"s3://{s3_bucket}/throttled"
        manifest = build(world.splits, url, config(world.cache))
        assert proxy.throttled > 0 and manifest["accounting"]["ok"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", server)  # the server itself: the proxy is gone
    assert_same_set(url, world.local)


def _cli(world, url: str) -> list[str]:
    return [
        "build",
        "--splits",
        str(world.splits),
        "--out",
        url,
        *TEST_OVERRIDES,
        f"cache.path={world.cache}",
    ]


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flora build: error: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def test_a_missing_bucket_is_one_error_line(world, s3_bucket, capsys):
    assert main(_cli(world, f"s3://{s3_bucket}-missing/x")) == 2
    _one_error_line(capsys, "does not exist")


def test_refused_credentials_are_one_error_line_and_never_printed(world, s3_bucket, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-4242")
    assert main(_cli(world, f"s3://{s3_bucket}/x")) == 2
    line = _one_error_line(capsys, "refused the credentials")
    assert "not-the-secret-4242" not in line


def test_an_unreachable_endpoint_is_one_error_line(world, s3_bucket, capsys, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    assert main(_cli(world, f"s3://{s3_bucket}/x")) == 2
    _one_error_line(capsys, "cannot reach", f"127.0.0.1:{port}")


def test_a_dead_endpoint_is_given_up_after_the_probe_attempts(
    world, s3_bucket, dead_endpoint, capsys, monkeypatch
):
    """Nothing answers: the first request is tried PROBE_ATTEMPTS times, not MAX_ATTEMPTS (seconds of
    backoff each)."""
    url, taken = dead_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    assert main(_cli(world, f"s3://{s3_bucket}/x")) == 2
    _one_error_line(capsys, "cannot reach", url.split("//")[1])
    assert 0 < taken[0] <= 2 * store.PROBE_ATTEMPTS < store.MAX_ATTEMPTS  # urllib3 may reconnect once


def test_a_prefix_with_another_data_sets_manifest_is_refused(world, s3_bucket, capsys):
    base = S3Url.parse(f"s3://{s3_bucket}/taken")
    theirs = {"version": "f" * 64, "shards": [], "accounting": {}}
    store.write_bytes(base.join("manifest.json"), json.dumps(theirs).encode())
    before = sorted(store.list_objects(base))
    assert main(_cli(world, base.url)) == 2
    _one_error_line(capsys, "another data set")
    assert sorted(store.list_objects(base)) == before, "nothing written"
