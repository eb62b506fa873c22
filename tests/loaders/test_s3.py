"""Loaders from object storage (``data.shards: s3://bucket/prefix``) against a real S3 server on
127.0.0.1 (SeaweedFS, the ``s3_bucket`` fixture): both backends read the same samples from the store
as from the local copy; the publisher's sample tables stand in for scans unless a tar changed under
them, without them the scan reads each tar once and is cached under the cache root (nothing is
written to the store); an epoch reads each planned jpg once; throttling is retried; a missing
bucket, refused credentials, an unreachable endpoint, a prefix without a manifest or with another
data set's manifest are one error line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks.loader_s3 import counts, proxy_process
from flora import store
from flora.config import ConfigError
from flora.loaders import create_dataloaders
from flora.loaders.__main__ import main
from flora.loaders.config import load_data_config
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError, build_index
from flora.loaders.reference import read_runs
from flora.sharding.build.remote import publish_tables
from flora.sharding.format.schema import table_name
from flora.store import S3Url

from ..training.conftest import teachers  # noqa: F401 - the fixture: trained test_vit checkpoints
from .conftest import data_cfg

pytestmark = pytest.mark.s3
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI")), "torch"]


def upload(root: Path, url: str, tables: bool = True) -> None:
    """A local shard folder's published files under ``url``, as ``flora build --out s3://`` lays them
    out (with its sample tables), or as ``aws s3 sync`` copies them (``tables=False``)."""
    base = S3Url.parse(url)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not rel.parts[0].startswith("_"):
            store.upload_file(path, base.join(rel.as_posix()))
    if tables:
        shards = json.loads((root / "manifest.json").read_text())["shards"]
        assert publish_tables(base, root, shards, {s["path"] for s in shards}) == len(shards)


@pytest.fixture
def s3_shards(shard_root, s3_bucket) -> str:
    url = f"s3://{s3_bucket}/sets/world"
    upload(shard_root, url)
    return url


@pytest.fixture
def s3_synced(shard_root, s3_bucket) -> str:
    """The shards copied into the store without sample tables."""
    url = f"s3://{s3_bucket}/sets/synced"
    upload(shard_root, url, tables=False)
    return url


def ids_and_labels(loader) -> dict[int, int]:
    out: dict[int, int] = {}
    for batch in loader:
        keep = batch["valid"]
        for i, label in zip(batch["index"][keep].tolist(), batch["label"][keep].tolist(), strict=True):
            assert i not in out, f"sample {i} twice in one epoch"
            out[i] = label
    return out


def keyed(loader, found: dict[int, int]) -> dict[str, int]:
    return {loader.index.keys[i]: label for i, label in found.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_samples_from_s3_as_from_the_local_copy(shard_root, s3_shards, tmp_path, backend):
    before = sorted(store.list_objects(S3Url.parse(s3_shards)))
    over = {"backend": backend, "train_remainder": "pad", "index_cache": "auto", "cache_root": str(tmp_path)}
    local_train, local_val, local_info = create_dataloaders(data_cfg(shard_root, **over))
    s3_train, s3_val, s3_info = create_dataloaders(data_cfg(s3_shards, **over))
    assert s3_info.samples == local_info.samples and s3_info.class_mapping == local_info.class_mapping
    for local, remote in ((local_val, s3_val), (local_train, s3_train)):
        want = keyed(local, ids_and_labels(local))
        got = keyed(remote, ids_and_labels(remote))
        assert got == want and len(got) == len(local.index)  # every sample once, with its label
    batch = next(iter(s3_train))
    assert batch["image"].shape == (16, 3, 64, 64) and batch["image"].dtype == torch.float32
    # the scans are cached under the cache root, one entry per tar; nothing was written to the store
    cached = list((tmp_path / "loader_index").glob("world-*/*.json"))
    assert len(cached) == len(s3_train.index.shards) + len(s3_val.index.shards)
    assert sorted(store.list_objects(S3Url.parse(s3_shards))) == before
    s3_train.close()
    local_train.close()


def test_a_first_epoch_reads_each_jpg_once_and_no_other_tar_bytes(s3_shards, tmp_path):
    """Bytes through a counting proxy: with the publisher's sample tables the index reads no tar bytes
    (a HEAD and the table per tar), and the torch loader's epoch reads the planned samples' jpgs in
    runs (a GET per batch's stretch of a shard): a first epoch from the store costs at most the tars'
    size."""
    root = S3Url.parse(s3_shards)
    prefix = f"/{root.bucket}/{root.key}/"
    cfg = load_data_config(data_cfg(s3_shards, backend="torch", index_cache="auto", cache_root=str(tmp_path)))
    with proxy_process(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy  # the s3_bucket fixture restores it
        train, val, _ = create_dataloaders(cfg)
        indexed = counts(proxy)["bytes"]
        for shard in [*train.index.shards, *val.index.shards]:
            assert indexed.get(prefix + shard.rel, 0) == 0, "the sample table stands in for the scan"
            assert 0 < indexed[prefix + table_name(shard.rel)] < shard.bytes / 10
        ids_and_labels(val)
        got = counts(proxy)
        order, size, index = val.order(0), val.batch_size, val.index
        runs = [r for i in range(0, len(order), size) for r in read_runs(index, order[i : i + size].tolist())]
        for i, shard in enumerate(index.shards):
            mine = [r for r in runs if index.shard_of(r[0]) == i]
            span = sum(
                int(index.jpg_offset[r[-1]] + index.jpg_size[r[-1]] - index.jpg_offset[r[0]]) for r in mine
            )
            jpg = int(index.jpg_size[index.bounds[i] : index.bounds[i + 1]].sum())
            assert got["bytes"][prefix + shard.rel] == span and jpg <= span <= shard.bytes  # each jpg once
            assert got["requests"][f"GET {prefix}{shard.rel}"] == len(mine)
        assert len(runs) < len(order) / 2, "a GET per stretch of a shard, not per jpg"
        train.close()


def test_without_tables_a_scan_reads_each_tar_once_and_a_cached_scan_no_tar(s3_synced, tmp_path):
    """A store filled by copying a local build (no sample tables): the scan reads every tar whole, once
    (its sha256 from the same pass); a second index of the same store (scan cache) reads none."""
    root = S3Url.parse(s3_synced)
    prefix = f"/{root.bucket}/{root.key}/"
    cfg = load_data_config(data_cfg(s3_synced, backend="torch", index_cache="auto", cache_root=str(tmp_path)))
    with proxy_process(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy  # the s3_bucket fixture restores it
        index = build_index(cfg, "val")
        scanned = counts(proxy)["bytes"]
        for shard in index.shards:
            assert scanned[prefix + shard.rel] == shard.bytes  # the whole tar, once
        build_index(cfg, "val")
        again = counts(proxy)["bytes"]
        for shard in index.shards:
            assert again[prefix + shard.rel] == shard.bytes, "a cached scan reads no tar bytes"


def test_a_tar_replaced_under_its_table_is_scanned_and_a_tampered_one_refused(s3_shards, tmp_path):
    """A table names its tar's ETag: a tar overwritten in the store (same size, one byte of a tar
    header's padding changed: no sample check sees it) is scanned, not trusted, and ``verify: full``
    refuses it as the local loader would; the untouched tars still come from their tables."""
    cfg = load_data_config(data_cfg(s3_shards, backend="torch", index_cache="auto", cache_root=str(tmp_path)))
    shard = build_index(cfg, "val").shards[0]
    url = S3Url.parse(str(shard.path))
    data = bytearray(store.read_bytes(url))
    data[500] ^= 0x01  # inside the first member's 512-byte header, past its fields: padding
    store.write_bytes(url, bytes(data))
    with pytest.raises(LoaderError, match="tampered shard store"):
        build_index(
            load_data_config(data_cfg(s3_shards, backend="torch", cache_root=str(tmp_path / "b"))), "val"
        )


def test_throttling_is_retried_not_fatal(s3_server, s3_shards, tmp_path):
    """The server answers 503 to any second concurrent read; the scan (threads) and the torch loader
    (workers x parallel GETs) retry and deliver every sample."""
    cfg = data_cfg(s3_shards, backend="torch", cache_root=str(tmp_path), index_cache="auto")
    s3_server.throttle({"Read": 1})
    try:
        _, val, info = create_dataloaders(cfg)
        assert len(ids_and_labels(val)) == info.samples["val"]
    finally:
        s3_server.throttle(None)


def run_cli(tmp_path: Path, shards: str, capsys) -> str:
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps(data_cfg(shards, backend="torch")))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flora loaders: error: "), err
    return err[0]


def test_a_missing_bucket_is_one_error_line(s3_bucket, tmp_path, capsys):
    assert "does not exist" in run_cli(tmp_path, f"s3://{s3_bucket}-missing/shards", capsys)


def test_refused_credentials_are_one_error_line_never_printed(s3_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-4242")
    line = run_cli(tmp_path, s3_shards, capsys)
    assert "refused the credentials" in line and "not-the-secret-4242" not in line


def test_an_unreachable_endpoint_is_one_error_line(s3_bucket, tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    line = run_cli(tmp_path, f"s3://{s3_bucket}/shards", capsys)
    assert "cannot reach" in line and f"127.0.0.1:{port}" in line


def test_a_dead_endpoint_is_given_up_after_the_probe_attempts(
    s3_bucket, dead_endpoint, tmp_path, capsys, monkeypatch
):
    url, taken = dead_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    line = run_cli(tmp_path, f"s3://{s3_bucket}/shards", capsys)
    assert "cannot reach" in line and url.split("//")[1] in line
    assert 0 < taken[0] <= 2 * store.PROBE_ATTEMPTS < store.MAX_ATTEMPTS  # urllib3 may reconnect once


def test_a_prefix_without_a_manifest_is_one_error_line(s3_shards, tmp_path, capsys):
    line = run_cli(tmp_path, s3_shards + "/train", capsys)  # tars there, but not a shard root
    assert "no manifest.json at" in line and s3_shards + "/train" in line


def test_another_data_sets_manifest_is_one_error_line(s3_bucket, tmp_path, capsys):
    base = S3Url.parse(f"s3://{s3_bucket}/theirs")
    store.write_bytes(base.join("manifest.json"), json.dumps({"files": ["a.parquet"], "rows": 3}).encode())
    assert "not a Flora shard manifest" in run_cli(tmp_path, base.url, capsys)


def test_a_manifest_whose_tars_are_elsewhere_is_one_error_line(shard_root, s3_bucket, tmp_path, capsys):
    base = S3Url.parse(f"s3://{s3_bucket}/copied")
    for name in ("manifest.json", "class_mapping.json"):
        store.upload_file(shard_root / name, base.join(name))
    assert "missing from the store" in run_cli(tmp_path, base.url, capsys)


def test_a_malformed_s3_location_is_a_config_error():
    with pytest.raises(ConfigError, match="data.shards"):
        load_data_config(data_cfg("s3:///no-bucket"))


def test_exports_parity_images_come_from_s3_as_from_the_local_copy(shard_root, s3_shards):
    from types import SimpleNamespace

    from flora.export.bundle import sample_images

    local = sample_images(SimpleNamespace(data={"shards": str(shard_root)}), None, 30, split="val")
    from_checkpoint = sample_images(SimpleNamespace(data={"shards": s3_shards}), None, 30, split="val")
    from_flag = sample_images(SimpleNamespace(data={}), s3_shards, 30, split="val")
    assert from_checkpoint == from_flag == local and len(local) == 30


@pytest.mark.slow
def test_evaluation_from_s3_equals_the_local_evaluation(teachers, shard_root, s3_shards, tmp_path):  # noqa: F811
    from flora.training.evaluate import evaluate

    kwargs = {"split": "val", "calibration_split": None}
    local = evaluate(teachers["global"], shards=str(shard_root), out_dir=tmp_path / "local", **kwargs)
    remote = evaluate(teachers["global"], shards=s3_shards, out_dir=tmp_path / "s3", **kwargs)
    assert remote["metrics"] == local["metrics"] and remote["samples"] == local["samples"]


@pytest.mark.skipif(not HAVE_DALI, reason="no DALI")
def test_dali_refuses_an_endpoint_host_name_it_would_address_virtual_host_style(s3_shards, monkeypatch):
    """DALI's S3 client asks ``bucket.localhost`` (which does not resolve) where boto3 asks
    ``localhost/bucket``: the DALI backend says so in one line, the torch backend reads the store."""
    from flora.loaders.index import LoaderError

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.replace("127.0.0.1", "localhost"))
    with pytest.raises(LoaderError, match=r"does not resolve; give AWS_ENDPOINT_URL with the") as err:
        create_dataloaders(data_cfg(s3_shards, backend="dali"))
    assert "\n" not in str(err.value) and "http://127.0.0.1:" in str(err.value)
    _, val, info = create_dataloaders(data_cfg(s3_shards, backend="torch"))
    assert len(ids_and_labels(val)) == info.samples["val"]


@pytest.mark.skipif(not HAVE_DALI, reason="no DALI")
def test_dali_is_given_the_s3_specific_endpoint(s3_shards, monkeypatch):
    """boto3 prefers ``AWS_ENDPOINT_URL_S3``; DALI reads ``AWS_ENDPOINT_URL`` only, so it is copied."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    _, val, info = create_dataloaders(data_cfg(s3_shards, backend="dali"))
    assert os.environ["AWS_ENDPOINT_URL"] == endpoint
    assert len(ids_and_labels(val)) == info.samples["val"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_down_answers_to_sample_reads_are_retried(s3_shards, tmp_path, backend):
    """``flora loaders`` (a fresh process: DALI's S3 client reads its endpoint once) through a
    proxy that answers every third sample read (a ranged GET) ``503 SlowDown``, six times: an epoch
    of both splits completes, every sample once (the audit). botocore retries the torch loader's
    GETs; DALI's reader cannot retry one, so its loader reads the rest of the epoch anew."""
    import subprocess
    import sys

    config = tmp_path / "data.yaml"
    config.write_text(json.dumps(data_cfg(s3_shards, backend=backend, cache_root=str(tmp_path / "c"))))
    audit = tmp_path / "audit.json"
    with proxy_process(os.environ["AWS_ENDPOINT_URL"], throttle_every=3, throttle_max=6) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy}
        cmd = [sys.executable, "-m", "flora.loaders", "--config", str(config), "--audit", str(audit)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        throttled = counts(proxy)["throttled"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert throttled == 6
    seen = json.loads(audit.read_text())
    val = seen["epochs"][0]["val"][0]
    assert sorted(val) == list(range(seen["samples"]["val"]))
