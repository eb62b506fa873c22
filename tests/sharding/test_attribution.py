"""Credits to the last photo: a build over a world of our own whose catalog names creators, rights
holders, licence deeds and source pages (some records name no creator) writes them into every sample's
json and into ATTRIBUTION.csv (one RFC 4180 row per live sample, sorted; counts in the manifest); an
incremental build over shards written before the credit fields existed (their jsons lack them, their
manifest's sample format is the older one) keeps those shards and still credits every image; a build
to S3 publishes the file beside the manifest."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from flora import store
from flora.io import read_jsonl, sha256_file
from flora.sharding.build.attribution import COLUMNS
from flora.sharding.build.run import build
from flora.sharding.catalog.records import url_key
from flora.sharding.format.schema import SampleMeta, safe_key
from flora.store import S3Url
from world import ImageServer, WorldSpec, build_world

from .build_settings import config
from .test_incremental import catalog_versions, tar_keys
from .test_neardup import drop_json_fields

#: The fields a sample's json gained with the credits: a build before them wrote none.
CREDITS = ("creator", "rights_holder", "license_url", "source_link")


def credited_rows(rows: list[dict]) -> list[dict]:
    """The world's records with credits: a creator (with a comma and quotes: CSV must quote it) for
    three in four, a rights holder, a deed and a source page (``references``: into the record's meta)."""
    out = []
    for i, r in enumerate(rows):
        extra = {"rights_holder": f"Herbarium {i % 3}", "references": f"https://example.org/photos/{i}"}
        if i % 4:
            extra["creator"] = f'Ann "Fern" Lee, no. {i % 5}'
        out.append({**r, **extra})
    return out


@pytest.fixture(scope="module")
def credited(tmp_path_factory):
    """A world; catalogs v1 (90% of its records) and v2 (all, ``--previous v1``) with credits; v1 built;
    a copy of it turned into a build from before the credits (one tar's jsons without them, the
    manifest's sample format the older one), grown to v2 incrementally."""
    root = tmp_path_factory.mktemp("credits")
    (root / "world" / "images").mkdir(parents=True)
    server = ImageServer(root / "world" / "images")
    spec = WorldSpec(n_records=150, n_species=5, seed=4, fault_rate=0.03, invalid_rate=0.0)
    w = build_world(root / "world", spec, base_url=server.base_url)
    for path, fault in w.faults.items():
        server.set_fault(path, fault)
    rows = credited_rows(w.records)
    catalog_versions(root, [r for i, r in enumerate(rows) if i % 10 != 9], rows)
    cache = root / "cache"
    with server:
        v1 = build(root / "splits_v1", root / "v1", config(cache))
        shutil.copytree(root / "v1", root / "inc")
        old_tar = as_built_before_credits(root / "inc")
        old_sha = sha256_file(root / "inc" / old_tar)
        inc = build(root / "splits_v2", root / "inc", config(cache))
        yield SimpleNamespace(root=root, cache=cache, v1=v1, inc=inc, old_tar=old_tar, old_sha=old_sha)


def as_built_before_credits(out: Path) -> str:
    """Rewrites the first tar of ``out`` with jsons lacking ``CREDITS`` (index and manifest entry
    updated) and records the older sample format in the manifest; returns the tar's path."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][0]
    drop_json_fields(out, entry, CREDITS)
    settings = manifest["build_settings"]
    settings["sample_meta"] = [f for f in settings["sample_meta"] if f not in CREDITS]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return entry["path"]


def catalog(splits: Path) -> dict[str, dict]:
    return {safe_key(url_key(r["image_url"])): r for r in read_jsonl(splits / "dataset_splits.jsonl")}


def sample_jsons(out: Path) -> dict[str, tuple[str, dict]]:
    """Sample key -> (its tar's path, its raw json) of every sample of a build."""
    found = {}
    for tar in sorted(out.glob("*/*/*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    found[m.name.split(".")[0]] = (
                        str(tar.relative_to(out)),
                        json.loads(t.extractfile(m).read()),
                    )
    return found


def attribution(out: Path) -> list[dict]:
    raw = (out / "ATTRIBUTION.csv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 0, "RFC 4180: CRLF line ends"
    reader = csv.reader(io.StringIO(raw.decode("utf-8"), newline=""))
    assert tuple(next(reader)) == COLUMNS
    return [dict(zip(COLUMNS, row, strict=True)) for row in reader]


def expected_row(key: str, record: dict) -> dict:
    return {
        "key": key, "split": record["split"], "region": record["region"], "latin_name": record["latin_name"],
        "creator": record.get("creator") or "", "rights_holder": record.get("rights_holder") or "",
        "license": record["license"] or "", "license_url": record.get("license_url") or "",
        "source_link": record["meta"]["references"], "image_url": record["image_url"],
    }  # fmt: skip


def test_every_sample_json_carries_its_credits(credited):
    records = catalog(credited.root / "splits_v1")
    jsons = sample_jsons(credited.root / "v1")
    assert len(jsons) == credited.v1["accounting"]["sharded"] > 50
    for key, (_, meta) in jsons.items():
        record = records[key]
        assert [meta[k] for k in CREDITS[:3]] == [record.get(k) for k in CREDITS[:3]]
        assert meta["source_link"] == record["meta"]["references"] == SampleMeta.from_json(meta).source_link
    assert any(m["creator"] is None for _, m in jsons.values()) and any(
        m["creator"] for _, m in jsons.values()
    )
    assert any(m["license_url"] for _, m in jsons.values()), "the catalog names licence deeds"


def test_attribution_has_exactly_one_row_per_live_sample(credited):
    out, records = credited.root / "v1", catalog(credited.root / "splits_v1")
    rows = attribution(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == tar_keys(out)
    assert rows == sorted(rows, key=lambda r: (r["split"], r["region"], r["key"]))
    jsons = sample_jsons(out)
    for row in rows:
        assert row == expected_row(row["key"], records[row["key"]])
        tar, _ = jsons[row["key"]]
        assert tar.startswith(f"{row['split']}/{row['region']}/")
    assert any('"Fern"' in r["creator"] and "," in r["creator"] for r in rows), "quoted fields round-trip"
    failed = {f["image_url"] for f in read_jsonl(out / "failures.jsonl")}
    assert failed and not failed & {r["image_url"] for r in rows}, "failures get no row"
    assert credited.v1["attribution"] == {
        "file": "ATTRIBUTION.csv", "rows": credited.v1["accounting"]["sharded"],
        "without_creator": sum(not r["creator"] for r in rows), "without_record": 0,
    }  # fmt: skip
    assert credited.v1["attribution"]["without_creator"] > 0


def test_an_incremental_build_over_shards_from_before_the_credits_credits_every_image(credited):
    out, records = credited.root / "inc", catalog(credited.root / "splits_v2")
    stats = credited.inc["last_run"]["incremental"]
    assert stats["kept_shards"] > 0 and stats["new_shards"] > 0, "the older shards are kept, not rebuilt"
    kept = {s["path"]: s["sha256"] for s in credited.inc["shards"]}
    assert kept[credited.old_tar] == credited.old_sha, "the older tar is kept byte for byte"
    jsons = sample_jsons(out)
    old = {k: meta for k, (tar, meta) in jsons.items() if tar == credited.old_tar}
    assert old and all(not set(CREDITS) & set(meta) for meta in old.values())
    assert all(SampleMeta.from_json(meta).creator is None for meta in old.values()), "older jsons still read"
    rows = attribution(out)
    assert {r["key"] for r in rows} == tar_keys(out) == set(jsons) and len(rows) == len(jsons)
    for row in rows:
        assert row == expected_row(row["key"], records[row["key"]])
    credits_of_old = [r for r in rows if r["key"] in old]
    assert any(r["creator"] for r in credits_of_old), "credited from the catalog, not the older json"
    assert credited.inc["attribution"]["rows"] == credited.inc["accounting"]["sharded"] == len(rows)


@pytest.mark.s3
def test_a_build_to_s3_publishes_the_file_beside_the_manifest(credited, s3_bucket):
    url = f"s3://{s3_bucket}/credits"
    manifest = build(credited.root / "splits_v1", url, config(credited.cache))
    assert manifest["attribution"] == credited.v1["attribution"]
    published = store.read_bytes(S3Url.parse(url).join("ATTRIBUTION.csv"))
    assert published == (credited.root / "v1" / "ATTRIBUTION.csv").read_bytes()
