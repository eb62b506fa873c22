"""The dataset card (sharding/build/card.py) beside every build's manifest: its numbers agree with the
tars (counted here with ``tarfile``, not through the card's index reads), the manifest, the logs and the
catalog's own reports; it is byte-stable; an older catalog without ``sources.json`` says "not recorded";
an incremental build, ``--keep-tombstones`` and ``--compact`` regenerate it with the new lineage; the CLI
prints its summary; its plots are valid PNGs; an ``s3://`` build publishes it beside the manifest."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from flora import store
from flora.config import load_config
from flora.sharding.__main__ import main
from flora.sharding.build.card import CARD_JSON, CARD_MD, write_card
from flora.sharding.build.card_plots import HAVE_MATPLOTLIB, PLOTS
from flora.sharding.build.run import build, compact_shards
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.store import S3Url
from world import ImageServer, WorldSpec, build_world

from .build_settings import TEST_OVERRIDES, config

CARD_FILES = (CARD_MD, CARD_JSON, *PLOTS.values())


def card_of(out: Path) -> dict:
    return json.loads((out / CARD_JSON).read_text(encoding="utf-8"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tar_counts(out: Path, manifest: dict) -> tuple[Counter, Counter]:
    """``(split, region, label) -> live samples`` and ``(split, licence class) -> live samples`` of the
    manifest's tars, read member by member with ``tarfile`` (tombstoned keys skipped)."""
    labels, licences = Counter(), Counter()
    for shard in manifest["shards"]:
        dead = set(shard.get("tombstones", []))
        with tarfile.open(out / shard["path"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if key in dead:
                    continue
                data = tar.extractfile(member).read()
                if ext == "cls":
                    labels[(shard["split"], shard["region"], int(data))] += 1
                elif ext == "json":
                    licences[(shard["split"], json.loads(data)["license_class"])] += 1
    return labels, licences


def assert_card_matches_tars(out: Path, splits: Path) -> dict:
    """The card's images and species per split and region, per-species counts, long tail and licence
    mix equal the tars' own counts; returns the card."""
    card, manifest = card_of(out), json.loads((out / "manifest.json").read_text())
    labels, licences = tar_counts(out, manifest)
    names = {v: k for k, v in json.loads((splits / "class_mapping.json").read_text()).items()}
    per_species = defaultdict(Counter)
    for (split, _region, label), n in labels.items():
        per_species[split][names[label]] += n
    for split in ("train", "val", "test"):
        assert card["images_per_species"][split] == dict(per_species[split]), split
        facts = card["splits"][split]
        assert facts["images"] == sum(per_species[split].values())
        assert facts["species"] == len(per_species[split])
        for region, r in facts["regions"].items():
            mine = {label: n for (s, reg, label), n in labels.items() if s == split and reg == region}
            assert (r["images"], r["species"]) == (sum(mine.values()), len(mine)), (split, region)
            assert r["images"] == manifest["totals"][split][region]["samples"]
        mine = {c: n for (s, c), n in licences.items() if s == split}
        assert card["licenses"][split]["classes"] == mine
        total = sum(mine.values())
        assert card["licenses"][split]["permissive_share"] == (
            round(mine.get("permissive", 0) / total, 4) if total else None
        )
    train = sorted(per_species["train"].values(), reverse=True)
    tail = card["long_tail"]["train"]
    assert (tail["with_1"], tail["under_5"], tail["under_20"]) == (
        sum(n == 1 for n in train), sum(n < 5 for n in train), sum(n < 20 for n in train),
    )  # fmt: skip
    head = train[: max(1, round(len(train) * 0.2))]
    assert tail["head_share"] == round(sum(head) / sum(train), 4)
    assert tail["tail_share"] == round(sum(n for n in train if n < 20) / sum(train), 4)
    return card


def test_card_agrees_with_tars_manifest_logs_and_catalog(faulty_world, faulty_shards):
    out, splits = faulty_shards.out, faulty_world.splits
    card = assert_card_matches_tars(out, splits)
    manifest = json.loads((out / "manifest.json").read_text())
    # the build stage: the manifest's accounting; failures and duplicates counted from the logs
    assert card["build"]["accounting"] == manifest["accounting"] and manifest["accounting"]["ok"]
    failures = Counter(row["reason"] for row in jsonl(out / "failures.jsonl"))
    assert card["failures"]["total"] == sum(failures.values()) > 0
    assert (
        card["failures"]["top"]
        == [[r, n] for r, n in sorted(failures.items(), key=lambda x: (-x[1], x[0]))][:5]
    )
    duplicates = jsonl(out / "duplicates.jsonl")
    by_split = Counter((d["split"], d["reason"]) for d in duplicates)
    for split, reasons in card["duplicates"]["by_split"].items():
        assert reasons == {r: n for (s, r), n in by_split.items() if s == split}
    assert card["duplicates"]["by_reason"] == dict(Counter(d["reason"] for d in duplicates))
    # the catalog stage and its sources, from the catalog's own files
    stats = json.loads((splits / "export_stats.json").read_text())
    for key in ("input_records", "written", "rejected", "duplicates", "rejects_by_reason"):
        assert card["catalog"][key] == stats[key], key
    assert stats["input_records"] == stats["written"] + stats["rejected"] + stats["duplicates"]
    assert stats["written"] == manifest["accounting"]["records_in"]
    assert card["sources"] == json.loads((splits / "sources.json").read_text())["sources"]
    version = json.loads((splits / "catalog_version.json").read_text())
    lineage = card["lineage"]
    assert lineage["catalog_fingerprint"] == version["fingerprint"] == f"sha256:{manifest['version']}"
    assert lineage["catalog_lineage"] == version["lineage"] and lineage["shards_parent"] is None
    # the md says the same
    md = (out / CARD_MD).read_text(encoding="utf-8")
    a = manifest["accounting"]
    assert f"Build: {a['records_in']} records in = {a['sharded']} sharded + {a['failed']} failed" in md
    assert f"Catalog: {stats['input_records']} records in = {stats['written']} written" in md
    assert card["sources"][0]["sha256"][:16] in md and version["fingerprint"] in md
    top_reason, top_count = card["failures"]["top"][0]
    assert f"| {top_reason} | {top_count} |" in md


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="the card's plots need matplotlib")
def test_plots_are_valid_pngs_linked_from_the_md(faulty_shards):
    md = (faulty_shards.out / CARD_MD).read_text(encoding="utf-8")
    for name in PLOTS.values():
        with Image.open(faulty_shards.out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
        assert f"]({name})" in md


def test_card_is_byte_stable_and_an_older_or_damaged_catalog_is_not_recorded(
    faulty_world, faulty_shards, tmp_path
):
    out = tmp_path / "shards"
    shutil.copytree(faulty_shards.out, out, ignore=shutil.ignore_patterns("_work", "_build.lock"))
    before = {name: (out / name).read_bytes() for name in CARD_FILES if (out / name).is_file()}
    for name in CARD_FILES:
        (out / name).unlink(missing_ok=True)
    write_card(out, faulty_world.splits)
    assert {name: (out / name).read_bytes() for name in before} == before
    older = tmp_path / "splits"
    shutil.copytree(faulty_world.splits, older, ignore=shutil.ignore_patterns("sources.json"))
    summary = write_card(out, older)
    assert summary["sources"] is None and card_of(out)["sources"] is None
    assert "Sources: not recorded" in (out / CARD_MD).read_text(encoding="utf-8")
    assert card_of(out)["images_per_species"] == json.loads(before[CARD_JSON])["images_per_species"]
    (older / "export_stats.json").write_text("{ not json", encoding="utf-8")  # a damaged report
    write_card(out, older)
    assert card_of(out)["catalog"] is None and "Catalog: not recorded." in (out / CARD_MD).read_text()


def test_cli_prints_the_card_summary_and_compact_and_retry_write_it_again(
    faulty_world, faulty_shards, tmp_path, capsys
):
    out, cache = tmp_path / "shards", tmp_path / "cache"
    shutil.copytree(faulty_shards.out, out)  # with its work area: the build resumes, nothing to download
    shutil.copytree(faulty_shards.cache, cache)
    code = main(["build", "--splits", str(faulty_world.splits), "--out", str(out), "--cache", str(cache),
                 *TEST_OVERRIDES, "processes=1"])  # fmt: skip
    printed = capsys.readouterr().out
    card = card_of(out)
    train, val, test = (card["splits"][s] for s in ("train", "val", "test"))
    assert code == 0
    assert f"images train/val/test {train['images']}/{val['images']}/{test['images']}" in printed
    tail = card["long_tail"]["train"]
    assert (
        f"train species with 1 / <5 / <20 images: {tail['with_1']}/{tail['under_5']}/{tail['under_20']}"
        in printed
    )
    assert f"wrote {out}/{CARD_MD}" in printed
    assert main(["build", "--splits", str(faulty_world.splits), "--out", str(out), "--compact"]) == 0
    printed = capsys.readouterr().out
    assert "dataset card:" in printed and f"wrote {out}/{CARD_MD}" in printed
    assert card_of(out) == card, "nothing compacted: the same card, the catalog's facts kept"
    for name in CARD_FILES:  # --retry-failed writes it again from the published set
        (out / name).unlink()
    retried = build(faulty_world.splits, out, config(cache), retry_failed=True)
    failures = Counter(row["reason"] for row in jsonl(out / "failures.jsonl"))
    assert card_of(out)["failures"]["total"] == sum(failures.values()) == retried["accounting"]["failed"]
    assert all((out / name).is_file() for name in CARD_FILES)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A small world; catalog v1 (most records) and v2 (``--previous v1``: all records but some removed);
    v1 built; v2 built over a copy with ``keep_tombstones`` (then compacted by the test)."""
    root = tmp_path_factory.mktemp("card-grown")
    (root / "world" / "images").mkdir(parents=True)
    server = ImageServer(root / "world" / "images")
    spec = WorldSpec(n_records=120, n_species=4, seed=7, duplicate_rate=0.0, invalid_rate=0.0, fault_rate=0.0)
    rows = build_world(root / "world", spec, base_url=server.base_url).records
    v1_rows = [r for i, r in enumerate(rows) if i % 6 != 5]
    v2_rows = [r for i, r in enumerate(rows) if i % 9 != 4]
    cat = load_config(CatalogConfig, None, ["progress=false"])
    for name, chosen in (("v1", v1_rows), ("v2", v2_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    run_catalog(str(root / "v1.jsonl"), root / "splits_v1", cat)
    run_catalog(str(root / "v2.jsonl"), root / "splits_v2", cat, previous=root / "splits_v1")
    with server:
        build(root / "splits_v1", root / "shards", config(root / "cache", "shards.max_samples=20"))
        v1_card = card_of(root / "shards")
        v2 = build(root / "splits_v2", root / "shards", config(root / "cache", "shards.max_samples=20"),
                   keep_tombstones=True)  # fmt: skip
    return root, v1_card, v2


def test_incremental_build_and_compact_regenerate_the_card(grown):
    root, v1_card, v2 = grown
    out = root / "shards"
    card = assert_card_matches_tars(out, root / "splits_v2")  # tombstones left in the tars not counted
    assert card["build"]["tombstones"] > 0
    v1_version = v1_card["lineage"]["shards_version"]
    lineage = card["lineage"]
    assert lineage["shards_parent"] == v1_version == v2["parent"] != lineage["shards_version"]
    assert lineage["catalog_lineage"] == [
        v1_card["lineage"]["catalog_fingerprint"],
        lineage["catalog_fingerprint"],
    ]
    growth = json.loads((root / "splits_v2" / "split_analysis.json").read_text())["growth"]
    assert lineage["growth"] == {k: growth[k] for k in ("kept", "new", "removed", "moved")}
    assert growth["new"] > 0 and growth["removed"] > 0
    md = (out / CARD_MD).read_text(encoding="utf-8")
    assert f"parent: `{v1_version[:12]}`" in md and f"new {growth['new']}" in md
    compacted = compact_shards(out)
    after = assert_card_matches_tars(out, root / "splits_v2")
    assert compacted["card"]["splits"]["train"]["images"] == after["splits"]["train"]["images"]
    assert after["build"]["tombstones"] == 0
    for key in ("sources", "catalog", "lineage", "images_per_species", "licenses"):
        assert after[key] == card[key], f"--compact keeps the card's {key}"


@pytest.mark.s3
def test_an_s3_build_publishes_the_card_beside_the_manifest(faulty_world, faulty_shards, s3_bucket):
    url = f"s3://{s3_bucket}/carded"
    manifest = build(faulty_world.splits, url, config(faulty_shards.cache))
    base = S3Url.parse(url)
    for name in CARD_FILES:
        assert store.read_bytes(base.join(name)) == (faulty_shards.out / name).read_bytes(), name
    local = card_of(faulty_shards.out)["splits"]
    assert manifest["card"]["splits"] == {
        s: {k: f[k] for k in ("images", "species")} for s, f in local.items()
    }
