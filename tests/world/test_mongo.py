"""MongoTestServer and load_records against a real SecantusDB server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from world import mongo
from world.mongo import LOOPBACK_HOST, MongoTestServer, load_records

pytestmark = pytest.mark.skipif(
    not (mongo.HAVE_PYMONGO and mongo.HAVE_SECANTUS), reason="needs pymongo and SecantusDB"
)

# Enough documents that a cursor with READ_BATCH needs several getMore calls after its first batch.
N_RECORDS = 2345
LOAD_BATCH = 1000
READ_BATCH = 500


def _records(n: int) -> list[dict]:
    return [
        {
            "image_id": f"img-{i:05d}",
            "latin_name": f"Bellis perennis {i % 13}",
            "common_name": "Gänseblümchen ✿ 雏菊" if i % 2 else None,
            "width": 640 + i,
            "location": {"lat": 45.5 + i / 10_000, "lon": 7.25, "region": {"code": "IT-21"}},
            "tags": ["flower", i % 3],
        }
        for i in range(n)
    ]


def _refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK_HOST, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def server() -> Iterator[MongoTestServer]:
    with MongoTestServer() as srv:
        yield srv


def _command_counter():
    """A pymongo CommandListener whose ``counts`` maps command name to how often a client started it."""
    from pymongo import monitoring

    class CommandCounter(monitoring.CommandListener):
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            self.counts[event.command_name] = self.counts.get(event.command_name, 0) + 1

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    return CommandCounter()


@pytest.mark.mongo
def test_server_answers_ping_and_stops(tmp_path):
    srv = MongoTestServer(tmp_path / "data")
    with srv:
        assert srv.running
        assert srv.uri == f"mongodb://{LOOPBACK_HOST}:{srv.port}"
        with srv.client() as client:
            assert client.admin.command("ping")["ok"] == 1.0
            # The server answering is the one this object started, not something else on the port.
            assert client.admin.command("serverStatus")["pid"] == srv._run.proc.pid
        port = srv.port
    assert not srv.running
    assert _refused(port)
    assert (tmp_path / "data").is_dir(), "an explicit storage_path must survive stop()"
    srv.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.uri


@pytest.mark.mongo
def test_data_survives_restart_on_the_same_storage_path(tmp_path):
    with MongoTestServer(tmp_path / "data") as srv, srv.client() as client:
        client.flora.images.insert_one({"latin_name": "Primula vulgaris", "width": 800})
    with MongoTestServer(tmp_path / "data") as srv, srv.client() as client:
        assert client.flora.images.find_one({}, {"_id": 0}) == {
            "latin_name": "Primula vulgaris",
            "width": 800,
        }


@pytest.mark.mongo
def test_load_records_round_trips_through_a_multi_batch_cursor(server):
    from pymongo import MongoClient

    records = _records(N_RECORDS)
    assert load_records(server.uri, "flora", "images", records, batch_size=LOAD_BATCH) == N_RECORDS
    assert all("_id" not in r for r in records), "load_records must not add _id to the caller's dicts"

    counter = _command_counter()
    with MongoClient(server.uri, event_listeners=[counter]) as client:
        coll = client.flora.images
        got = list(coll.find({}, projection={"_id": 0}).sort("image_id", 1).batch_size(READ_BATCH))
        assert "latin_name_1" in coll.index_information()
    assert got == records
    assert counter.counts.get("getMore", 0) >= N_RECORDS // READ_BATCH


@pytest.mark.mongo
def test_load_records_drop_replaces_and_no_drop_appends(server):
    first, second = _records(30), _records(20)
    load_records(server.uri, "flora", "drop_check", first, batch_size=7)
    assert load_records(server.uri, "flora", "drop_check", second, batch_size=7, drop=True) == 20
    assert load_records(server.uri, "flora", "drop_check", iter(first), batch_size=7, drop=False) == 30
    with server.client() as client:
        assert client.flora.drop_check.count_documents({}) == 50


@pytest.mark.mongo
def test_load_records_rejects_a_non_positive_batch_size(server):
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        load_records(server.uri, "flora", "images", _records(1), batch_size=0)


@pytest.mark.mongo
def test_two_servers_run_concurrently_and_independently(server):
    with MongoTestServer() as other, server.client() as a, other.client() as b:
        assert other.port != server.port
        a.flora.only_in_a.insert_one({"latin_name": "Viola odorata"})
        b.flora.only_in_b.insert_many([{"latin_name": "Iris germanica"}, {"latin_name": "Iris sibirica"}])
        assert a.flora.only_in_a.count_documents({}) == 1
        assert b.flora.only_in_b.count_documents({}) == 2
        assert "only_in_a" not in b.flora.list_collection_names()
        assert "only_in_b" not in a.flora.list_collection_names()
    with server.client() as a:
        assert a.flora.only_in_a.count_documents({}) == 1, "stopping one server must leave the other running"


@pytest.mark.mongo
def test_explicit_port_in_use_fails_with_the_server_log():
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK_HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"port {port} was taken(.|\n)*Address already in use"):
            MongoTestServer(port=port).start()


@pytest.mark.mongo
def test_start_retries_on_another_port_after_a_clash(monkeypatch):
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK_HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = mongo.free_port
        monkeypatch.setattr(mongo, "free_port", lambda: next(ports, None) or real_free_port())
        with MongoTestServer() as srv, srv.client() as client:
            assert srv.port != taken
            assert client.admin.command("ping")["ok"] == 1.0
