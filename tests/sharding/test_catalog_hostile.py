"""The catalog on sources that hold no usable record, and on a disk that fills while it writes.

No usable record (real files, and real collections on the session's MongoDB test server): a JSON
array, pretty-printed JSON, CSV, TSV, an empty file, a gzip file without ``.gz``, every line of the
wrong schema, everything dropped by ``production_only`` or the rare-species rule, an empty
collection, a filter that matches nothing. Each is exit status 2, one ``error:`` line naming the
source, the count and reason of the rejects and the likely cause; no file is written, and a previous
catalog in ``--out`` stays byte for byte.

A full disk (a real tmpfs, so those tests need root): one line naming the stage and the file,
nothing of the run left (no ``.tmp``, no empty file), a previous catalog unchanged, and the re-run
after freeing space writes the same files as a run on a roomy disk.
"""

import errno
import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from flora.config import load_config
from flora.sharding.__main__ import main
from flora.sharding.catalog.intake import NoUsableRecordError
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig

from .test_disk_faults import tmpfs

FULL = f"No space left on device [Errno {errno.ENOSPC}]"


def rec(i, name="Olea europaea", **fields):
    return {"plant_id": i, "latin_name": name, "image_url": f"http://h/{i}.jpg", "license": "cc-by", **fields}


RECORDS = [rec(i) for i in range(6)]
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS)
CSV = "plant_id,latin_name,image_url\n" + "".join(f"{i},Olea europaea,http://h/{i}.jpg\n" for i in range(6))
OTHER_SCHEMA = "".join(
    json.dumps({"id": i, "species": "Olea europaea", "url": "http://h/x"}) + "\n" for i in range(4)
)


def catalog(source: Path, out: Path, *extra: str) -> int:
    return main(["catalog", "--source", str(source), "--out", str(out), "--no-progress", *extra])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("flora catalog: error: no usable record in "), err
    return err


# ------------------------------------------------------------------------------ no usable record
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "plants.json",
            json.dumps(RECORDS),
            ["jsonl:plants.json: 1 line read, rejected as not_an_object", "it holds a JSON array",
             "jq -c '.[]' plants.json > plants.jsonl"],
        ),
        (
            "pretty.json",
            json.dumps(RECORDS, indent=2),
            [f"{len(json.dumps(RECORDS, indent=2).splitlines())} lines read, all rejected as invalid_json",
             "it holds a JSON array, not JSON Lines"],
        ),
        (
            "objects.json",
            "".join(json.dumps(r, indent=2) + "\n" for r in RECORDS),
            ["all rejected as invalid_json", "it holds pretty-printed JSON", "jq -c . objects.json"],
        ),
        (  # a .csv is read as a table (test_table_source.py); CSV text under a JSON Lines name:
            "plants-csv.txt",
            CSV,
            ["jsonl:plants-csv.txt: 7 lines read, all rejected as invalid_json", "it looks like CSV (first "
             "line 'plant_id,latin_name,image_url')"],
        ),
        (
            "plants-tsv.jsonl",
            "plant_id\tlatin_name\timage_url\n1\tOlea europaea\thttp://h/1.jpg\n",
            ["jsonl:plants-tsv.jsonl: 2 lines read, all rejected as invalid_json", "it looks like TSV"],
        ),
        ("empty.jsonl", "", ["jsonl:empty.jsonl: the file is empty;"]),
        ("blank.jsonl", "\n  \n\n", ["the file holds only blank lines"]),
        (
            "export.jsonl",
            gzip.compress(JSONL.encode()),
            ["all rejected as invalid_json", "it is gzip-compressed but not named .gz; rename it to "
             "export.jsonl.gz"],
        ),
        (
            "other.jsonl",
            OTHER_SCHEMA,
            ["4 lines read, all rejected as missing_field; the first, line 1: missing required field(s): "
             "plant_id, latin_name, image_url (its fields: id, species, url)"],
        ),
        (
            "mixed.jsonl",
            "{bad\n" + json.dumps(rec(1, image_url="ftp://h/1.jpg")) + "\n" + json.dumps(rec(2, image_url="ftp://h/2")),
            ["3 lines read, all rejected (bad_scheme 2, invalid_json 1); the first, line 1 (invalid_json): "],
        ),
    ],
    ids=["json-array", "pretty-array", "pretty-objects", "csv", "tsv", "empty", "blank-lines", "gzip-unnamed",
         "wrong-schema", "mixed-reasons"],
)  # fmt: skip
def test_a_source_without_a_usable_record_is_one_line_and_writes_nothing(
    tmp_path, capsys, name, content, expected
):
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    assert catalog(source, out) == 2
    err = one_error_line(capsys)
    for part in expected:
        assert part in err, (part, err)
    assert err.rstrip().endswith(f"nothing was written to {out}")
    assert not out.exists()  # not even an empty folder a later stage could take for a catalog


def test_a_previous_catalog_in_out_stays_as_it_was(tmp_path, capsys):
    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.json", tmp_path / "out"
    good.write_text(JSONL)
    bad.write_text(json.dumps(RECORDS))
    assert catalog(good, out) == 0
    before = files(out)
    assert "dataset_splits.jsonl" in before
    capsys.readouterr()
    assert catalog(bad, out) == 2
    assert "it holds a JSON array" in one_error_line(capsys)
    assert files(out) == before


@pytest.mark.parametrize(
    ("lines", "overrides", "expected"),
    [
        (
            [rec(1, license="cc-by-nc"), rec(2, license="all rights reserved")],
            ["production_only=true"],
            "2 lines read, all rejected as restrictive_license; the first, line 1: license cc-by-nc is "
            "restrictive; production_only",
        ),
        (
            [rec(1), rec(2, "Abies alba")],
            ["split.min_images_per_species=2"],
            "2 lines read, all rejected as rare_species; the first, line 1: Olea europaea has 1 images (< 2)",
        ),
        (
            [rec(1, image_url="http://h/a.jpg"), rec(2, "Abies alba", image_url="HTTP://h/a.jpg")],
            [],
            "2 lines read, all rejected as url_species_conflict",
        ),
    ],
    ids=["production-only-leaves-nothing", "all-rare", "all-conflicting"],
)
def test_rules_that_leave_no_record_are_refused_too(tmp_path, lines, overrides, expected):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(CatalogConfig, None, ["progress=false", "regions=[EU_SW]", *overrides])
    with pytest.raises(NoUsableRecordError) as info:
        run_catalog(str(source), tmp_path / "out", cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.mongo
def test_an_empty_collection_and_a_filter_matching_nothing(mongo_server, tmp_path, capsys):
    from world.mongo import load_records

    client = mongo_server.client()
    try:
        client["flora_hostile"].drop_collection("empty")
        client["flora_hostile"].create_collection("empty")
    finally:
        client.close()
    load_records(mongo_server.uri, "flora_hostile", "images", RECORDS)
    load_records(mongo_server.uri, "flora_hostile", "wrong", [{"species": "Olea europaea"}] * 3)
    out = tmp_path / "out"

    assert catalog(f"{mongo_server.uri}/flora_hostile.empty", out) == 2
    err = one_error_line(capsys)
    assert "mongodb:flora_hostile.empty: the collection is empty; nothing was written" in err

    assert catalog(f"{mongo_server.uri}/flora_hostile.images", out, 'mongo.filter={"source": "nowhere"}') == 2
    err = one_error_line(capsys)
    assert 'no document matches mongo.filter {"source": "nowhere"} (the collection holds 6)' in err

    assert catalog(f"{mongo_server.uri}/flora_hostile.wrong", out) == 2
    err = one_error_line(capsys)
    assert "3 documents read, all rejected as missing_field; the first, document 0 (_id " in err
    assert "(its fields: species)" in err
    assert not out.exists()

    assert catalog(f"{mongo_server.uri}/flora_hostile.images", out) == 0  # the same server, a good collection
    assert json.loads((out / "export_stats.json").read_text())["written"] == len(RECORDS)


# ------------------------------------------------------------------------------ a full disk
def leftovers(root: Path) -> list[str]:
    """Temporaries, and empty JSON files, under ``root`` (an empty JSONL log is valid)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and (".tmp" in p.name or (p.stat().st_size == 0 and p.suffix == ".json"))
    )


def big_source(path: Path, n: int = 3000) -> Path:
    """``n`` records of 40 species whose ``meta`` makes the catalog's files about 14 MB in all."""
    padding = "x" * 1000
    lines = (json.dumps(rec(i, f"Species{i % 40} alba", note=padding)) + "\n" for i in range(n))
    path.write_text("".join(lines))
    return path


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, capsys):
    source = big_source(tmp_path / "big.jsonl")
    with tmpfs(tmp_path / "disk", "3m") as disk:
        out = disk / "splits"
        assert catalog(source, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(
            f"flora catalog: error: catalog: writing the catalog files: cannot write {out}/"
        )
        assert (
            ".jsonl.tmp: " in err and FULL in err and "free space on that filesystem and run it again" in err
        )
        assert leftovers(disk) == [] and list(out.iterdir()) == []  # nothing a build could read

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert catalog(source, out) == 0  # finishes once there is space ...
        reference = tmp_path / "reference"
        assert catalog(source, reference) == 0
        assert files(out) == files(reference)  # ... with the files a roomy disk gets


@needs_root
def test_a_full_disk_keeps_the_previous_catalog(tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text(JSONL)
    source = big_source(tmp_path / "big.jsonl")
    with tmpfs(tmp_path / "disk", "3m") as disk:
        out = disk / "splits"
        assert catalog(small, out) == 0
        before = files(out)
        capsys.readouterr()
        assert catalog(source, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and FULL in err and f"those already in {out} are unchanged" in err
        assert files(out) == before and leftovers(disk) == []
