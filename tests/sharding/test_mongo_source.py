"""The catalog reading a real MongoDB wire-protocol server: same output as JSONL, batch cursors,
projection and filter, and one-line errors with the password redacted."""

import json
from collections import Counter

import pytest
from pymongo import monitoring

from flora.config import load_config
from flora.sharding.__main__ import main
from flora.sharding.catalog.run import run_catalog
from flora.sharding.catalog.sources import MongoSource, SourceError, redact
from flora.sharding.config import CatalogConfig, MongoConfig
from world import WorldSpec, generate_catalog
from world.mongo import free_port, load_records

pytestmark = pytest.mark.mongo


@pytest.fixture(scope="module")
def records():
    return generate_catalog(WorldSpec(n_records=800, n_species=25, seed=5), base_url="http://127.0.0.1:9")


@pytest.fixture(scope="module")
def loaded(mongo_server, records):
    load_records(mongo_server.uri, "flora_test", "images", records)
    return f"{mongo_server.uri}/flora_test.images"


def test_mongodb_and_jsonl_give_byte_identical_catalogs(loaded, records, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    overrides = ["regions=[EU_SW]", "progress=false", "mongo.batch_size=64"]  # 800 docs: 13 getMore batches
    from_mongo = run_catalog(loaded, tmp_path / "m", load_config(CatalogConfig, None, overrides))
    run_catalog(str(src), tmp_path / "j", load_config(CatalogConfig, None, overrides))
    assert from_mongo.stats["input_records"] == len(records)
    assert from_mongo.stats["source"] == "mongodb:flora_test.images"
    for path in sorted((tmp_path / "j").iterdir()):
        if path.name in ("export_stats.json", "rejects.jsonl", "sources.json"):
            continue  # they name the source and the positions (line numbers vs document _ids)
        assert path.read_bytes() == (tmp_path / "m" / path.name).read_bytes(), path.name
    mongo_rejects = [json.loads(line) for line in (tmp_path / "m" / "rejects.jsonl").read_text().splitlines()]
    assert mongo_rejects and all(
        r["position"].startswith("document ") and "_id" in r["position"] for r in mongo_rejects
    )


def test_filter_projection_and_keep_id(loaded, records):
    cfg = MongoConfig(
        filter={"source": "Perenual"},
        fields=["plant_id", "latin_name", "image_url"],
        keep_id=True,
        batch_size=7,
    )
    docs = [doc for _, doc in MongoSource(loaded, cfg)]
    assert len(docs) == sum(r.get("source") == "Perenual" for r in records) > 0
    assert all(set(doc) <= {"plant_id", "latin_name", "image_url", "_id"} for doc in docs)
    assert all(isinstance(doc["_id"], str) for doc in docs)


def test_missing_collection_is_one_clear_line(mongo_server, tmp_path, capsys):
    code = main(["catalog", "--source", f"{mongo_server.uri}/flora_test.nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "collection flora_test.nope not found" in err and "images" in err


def test_uri_must_name_database_and_collection(mongo_server):
    with pytest.raises(SourceError, match="must name database and collection"):
        MongoSource(f"{mongo_server.uri}/onlydb", MongoConfig())


def test_unreachable_server_fails_fast_without_leaking_the_password(tmp_path, capsys):
    uri = f"mongodb://flora:s3cr3t-pw@127.0.0.1:{free_port()}/plants.images"
    code = main(["catalog", "--source", uri, "--out", str(tmp_path), "mongo.timeout_s=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("flora catalog: error: cannot reach MongoDB at mongodb://flora:***@127.0.0.1")
    assert "s3cr3t" not in err and err.count("\n") == 1


def test_user_without_password_needs_the_environment_variable(monkeypatch):
    monkeypatch.delenv("FLORA_MONGO_PASSWORD", raising=False)
    with pytest.raises(SourceError, match=r"no password, and \$FLORA_MONGO_PASSWORD is not set"):
        MongoSource(f"mongodb://flora@127.0.0.1:{free_port()}/plants.images", MongoConfig(timeout_s=1))


def test_redact():
    assert redact("x mongodb+srv://u:p%40ss@h/db.c y") == "x mongodb+srv://u:***@h/db.c y"
    assert redact("mongodb://h:1/db.c") == "mongodb://h:1/db.c"


class _CommandCounter(monitoring.CommandListener):
    def __init__(self):
        self.commands = Counter()

    def started(self, event):
        self.commands[event.command_name] += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def test_reads_through_one_batch_cursor(loaded, records):
    counter = _CommandCounter()
    monitoring.register(counter)  # applies to clients created from now on, i.e. MongoSource's
    docs = list(MongoSource(loaded, MongoConfig(batch_size=100)))
    assert len(docs) == len(records)
    assert counter.commands["find"] == 1
    assert counter.commands["getMore"] >= len(records) // 100 - 1


def test_password_from_the_environment_with_a_real_user(mongo_server, loaded, monkeypatch, tmp_path, capsys):
    with mongo_server.client() as client:
        if "flora_reader" not in {u["user"] for u in client.flora_test.command("usersInfo")["users"]}:
            client.flora_test.command("createUser", "flora_reader", pwd="right-pw", roles=["read"])
    uri = f"mongodb://flora_reader@127.0.0.1:{mongo_server.port}/flora_test.images"
    monkeypatch.setenv("FLORA_MONGO_PASSWORD", "right-pw")
    assert sum(1 for _ in MongoSource(uri, MongoConfig())) == 800
    monkeypatch.setenv("FLORA_MONGO_PASSWORD", "wrong-pw")
    assert main(["catalog", "--source", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora catalog: error: MongoDB refused mongodb://flora_reader@")
    assert "wrong-pw" not in err


def test_javascript_doubles_and_a_bad_filter(mongo_server, tmp_path, capsys):
    with mongo_server.client() as client:
        coll = client.flora_js.images
        coll.drop()
        coll.insert_many(
            [{"plant_id": 2.0, "latin_name": "Olea europaea", "image_url": f"http://h/{i}"} for i in range(3)]
        )
    stats = run_catalog(
        f"{mongo_server.uri}/flora_js.images", tmp_path / "o", CatalogConfig(progress=False)
    ).stats
    assert stats["written"] == 3 and stats["rejected"] == 0
    code = main(
        [
            "catalog",
            "--source",
            f"{mongo_server.uri}/flora_js.images",
            "--out",
            str(tmp_path / "p"),
            "mongo.filter={plant_id: {$badop: 1}}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "flora_js.images" in err
