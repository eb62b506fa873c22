"""The catalog reading a real MongoDB wire-protocol server: same output as JSONL, batch cursors,
projection and filter, and one-line errors with the password redacted."""

import json

import pytest

from sharding.__main__ import main
from sharding.catalog import run_catalog
from sharding.config import CatalogConfig, MongoConfig, load_config
from sharding.sources import MongoSource, SourceError, redact
from sharding.world import WorldSpec, generate_catalog
from sharding.world.mongo import free_port, load_records

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
        if path.name in ("export_stats.json", "rejects.jsonl"):
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
    assert err.startswith("error: cannot reach MongoDB at mongodb://flora:***@127.0.0.1")
    assert "s3cr3t" not in err and err.count("\n") == 1


def test_user_without_password_needs_the_environment_variable(monkeypatch):
    monkeypatch.delenv("FLORA_MONGO_PASSWORD", raising=False)
    with pytest.raises(SourceError, match=r"no password, and \$FLORA_MONGO_PASSWORD is not set"):
        MongoSource(f"mongodb://flora@127.0.0.1:{free_port()}/plants.images", MongoConfig(timeout_s=1))


def test_redact():
    assert redact("x mongodb+srv://u:p%40ss@h/db.c y") == "x mongodb+srv://u:***@h/db.c y"
    assert redact("mongodb://h:1/db.c") == "mongodb://h:1/db.c"
